"""The command line: help, exit codes, one-line errors, the demo."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from PIL import Image

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


def test_console_script_demo_removes_two_minicanvas_styles(tmp_path):
    from diffusers_unlearn import minicanvas as mc
    from diffusers_unlearn.bench import family_round_robin

    result = subprocess.run(
        [sys.executable, "-m", "diffusers_unlearn.cli", "demo", "--steps", "3", "--eval-seeds", "1", "--eval-steps", "4",
         "--quiet", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    removed = family_round_robin(mc.STYLE_FAMILIES)[:2]
    assert f"removed concepts: {removed}" in result.stdout
    rows = re.findall(r"^\| (base model|after removing [^|]+) \| (n/a|[\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                      r"(n/a|[\d.]+) \| (n/a|[\d.]+) \|$", result.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["base model", f"after removing {removed[0]}", f"after removing {', '.join(removed)}"]
    assert rows[0][1] == rows[0][4] == "n/a"  # nothing removed: no UA, no removed prompts to keep objects in
    assert all(0 <= float(v) <= 100 for r in rows[1:] for v in r[1:5])
    assert all(r[5] == "n/a" for r in rows)  # one evaluation seed: no seed gap to measure the change in
    assert "scored (never protected): 24 styles and 4 objects" in result.stdout
    assert (tmp_path / "ledger.json").is_file()
    with Image.open(tmp_path / "demo_grid.png") as grid:
        assert grid.format == "PNG" and grid.width > grid.height
    assert "torchvision" not in result.stderr
