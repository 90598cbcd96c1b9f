"""Renamed options: old keyword names that keep working for one release, with a ``FutureWarning`` naming the new one
(as diffusers' ``deprecate`` does), and records written under the old names read back silently."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from ._warn import _PACKAGE_DIR

REMOVED_IN = "0.3.0"  # the release that drops the names renamed in 0.2.0


def rename_options(owner: str, renamed: Mapping[str, str], options: Mapping[str, Any], *,
                   warn: bool = True) -> dict[str, Any]:
    """``options`` with each old name of ``renamed`` replaced by its new name.

    Args:
        owner: what the options belong to, for the messages (a class or method name).
        renamed: old name -> new name.
        options: keyword options as given, or a stored record's settings.
        warn: emit a ``FutureWarning`` for each old name (a user's call); False for records read back (a ledger
            saved by an earlier version holds the old names through no fault of the reader).

    Returns:
        A new dict with the new names.

    Raises:
        TypeError: an old name and its new name both given.
    """
    out = dict(options)
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(f"{owner}: got both {old!r} and {new!r}; {old!r} is the deprecated name of {new!r}, "
                            f"pass {new!r} only")
        if warn:
            warnings.warn(f"{owner}: `{old}` is deprecated and will be removed in version {REMOVED_IN}; use `{new}` "
                          f"instead", FutureWarning, stacklevel=_caller_stacklevel())
        out[new] = out.pop(old)
    return out


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package, seen from ``rename_options``'s caller."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class _RenamedOptionsMeta(type):
    """Maps a class's ``renamed_options`` in its constructor's keywords, whatever builds the ``__init__`` (a
    dataclass subclass gets a new one)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        renamed = getattr(cls, "renamed_options", None)
        if renamed:
            kwargs = rename_options(cls.__name__, renamed, kwargs)
        return super().__call__(*args, **kwargs)


class RenamedOptions(metaclass=_RenamedOptionsMeta):
    """Base of settings classes with renamed fields: ``renamed_options`` maps each old name to its new one. The
    constructor takes the old names with a ``FutureWarning``; reading an old attribute gives the new one's value."""

    renamed_options: ClassVar[Mapping[str, str]] = {}

    def __getattr__(self, name: str) -> Any:
        new = type(self).renamed_options.get(name)
        if new is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"{type(self).__name__}: `{name}` is deprecated and will be removed in version {REMOVED_IN}; "
                      f"use `{new}` instead", FutureWarning, stacklevel=2)
        return getattr(self, new)
