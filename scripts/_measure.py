"""Helpers shared by the benchmark scripts: load the model, run a variant in a fresh process and read its peak
memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def load(model: str) -> tuple[Any, str]:
    """The attached pipeline of ``model`` ("minicanvas" or "tiny") and a prompt of a concept it draws.

    Imported here, not at module level, so that ``--help`` stays instant.
    """
    import diffusers_unlearn as du

    if model == "minicanvas":
        from diffusers_unlearn import minicanvas

        return du.attach(minicanvas.load_pipeline()), "a bird in neon lines style"
    return du.attach(du.testing.tiny_pipeline(seed=0)), "a painting in van gogh style"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, args: list[str]) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (so peak memory is its own) and parse its JSON line."""
    out = subprocess.run([sys.executable, str(script), "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
