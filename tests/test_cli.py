"""The command line: help, exit codes, one-line errors, the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffusers_unlearn.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_unknown_subcommand_is_bad_usage():
    with pytest.raises(SystemExit) as info:
        main(["nope"])
    assert info.value.code == 2


def test_console_script_demo_runs_and_prints_the_ledger(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_unlearn.cli", "demo", "--steps", "3", "--quiet", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed concepts: ['van gogh', 'dog']" in result.stdout
    assert (tmp_path / "ledger.json").is_file()
    assert "torchvision" not in result.stderr
