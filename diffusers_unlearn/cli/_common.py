"""Helpers shared by the deployment subcommands (unlearn, run, fold, audit, push)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

MODEL_HELP = ("'tiny' or 'tiny-sdxl' (offline test pipelines), a pipeline folder (an unlearned folder keeps its "
              "ledger) or a Hub model id")


def finite_float(text: str) -> float:
    """argparse ``type`` for numbers: NaN, Inf and values beyond float range are refused, as everywhere else."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="load the model in this dtype (default: as saved)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where it loads, the CPU)")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def set_quiet(quiet: bool) -> None:
    """Silence diffusers' and transformers' own progress bars (loading, saving) when asked."""
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def load(model: str, args: argparse.Namespace) -> Any:
    """The pipeline named on the command line, with its progress bars set by ``--quiet``."""
    from ..pipelines import load_pipeline

    set_quiet(getattr(args, "quiet", False))
    pipe = load_pipeline(model, torch_dtype=getattr(args, "dtype", None), device=getattr(args, "device", None))
    pipe.set_progress_bar_config(disable=getattr(args, "quiet", False))
    return pipe


def is_ledger_folder(path: Path) -> bool:
    """A folder written by ``save_unlearning`` / ``demo --out`` (ledger.json at the top, no pipeline)."""
    return (path / "ledger.json").is_file() and not (path / "model_index.json").is_file()


def load_folder(folder: str, model: str | None, args: argparse.Namespace) -> Any:
    """A pipeline for FOLDER: an unlearned pipeline folder loads as it is; a ledger folder is loaded onto ``--model``
    (the base it was made on)."""
    from ..cli import UsageError

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if is_ledger_folder(path):
        if model is None:
            raise UsageError(f"{folder} holds a ledger without a pipeline: pass --model, the base it was made on")
        pipe = load(model, args)
        pipe.load_unlearning(path, replace=True)
        return pipe
    if model is not None:
        raise UsageError(f"--model is only for ledger folders; {folder} is a pipeline folder")
    return load(folder, args)


def short(text: str, limit: int = 60) -> str:
    """A concept for one-line output: repr (so line breaks show as \\n) and at most ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
