"""Warnings only where the user can act on them (issue 33): transformers' torchvision notice is silenced where the
package is imported, and nothing else of transformers is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_torchvision_notice_is_silenced_and_other_transformers_messages_pass():
    code = ("import logging, diffusers_unlearn as du\n"
            "du.testing.tiny_pipeline(seed=0)\n"
            "import transformers.models.auto.image_processing_auto\n"
            "logging.getLogger('transformers.utils.import_utils').warning('some other notice requires attention')\n")
    # the CLI sets TRANSFORMERS_VERBOSITY in its own process; a test that ran it in this worker must not leak it here
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requires torchvision" not in result.stderr
    assert "some other notice requires attention" in result.stderr


def test_a_local_venv_is_ignored_by_git():
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().split()
    assert ".venv/" in ignored
