"""Warnings that point at the caller's own line, never at this package's internals."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class UnlearnWarning(UserWarning):
    """A diffusers-unlearn warning. ``settings`` names the settings that address it and their current values (e.g.
    ``{"neighbors": 8}``), so that a front end (the command line) can name its own flags."""

    def __init__(self, message: str, settings: dict[str, Any] | None = None):
        super().__init__(message)
        self.settings = dict(settings or {})


def warn(message: str, settings: dict[str, Any] | None = None) -> None:
    """``warnings.warn`` attributed to the first frame outside this package (what Python 3.12's
    ``skip_file_prefixes`` does), so the warning shows the user's call, not an internal line."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(UnlearnWarning(message, settings), stacklevel=level)
