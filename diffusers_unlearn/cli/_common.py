"""Helpers shared by the subcommands: the model argument, loading, --quiet, defaults shown in --help.

Nothing here imports torch, diffusers or transformers at module level: ``--help`` must answer at once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..worlds import world_names

_PACKAGE_DIR = Path(__file__).resolve().parent.parent

MODEL_HELP = (f"a world name ({', '.join(world_names())}; 'minicanvas' brings its calibrated request recipe), a "
              "pipeline folder (an unlearned folder keeps its ledger) or a Hub model id")


@functools.lru_cache(maxsize=None)
def dataclass_defaults(module_file: str, class_name: str) -> dict[str, Any]:
    """The literal field defaults of a dataclass, read from its source file without importing it.

    ``--help`` shows defaults that live in modules importing torch; reading them this way keeps ``--help`` instant
    and the numbers in one place. ``module_file`` is relative to the package (``"bench/protocols.py"``). Fields whose
    default is not a literal are left out.
    """
    tree = ast.parse((_PACKAGE_DIR / module_file).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            defaults = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    try:
                        defaults[item.target.id] = ast.literal_eval(item.value)
                    except ValueError:
                        continue
            return defaults
    raise LookupError(f"no class {class_name} in {module_file}")


@functools.lru_cache(maxsize=None)
def module_constant(module_file: str, name: str) -> Any:
    """The literal value of a module-level assignment ``name = ...`` (annotated or not), read without importing."""
    tree = ast.parse((_PACKAGE_DIR / module_file).read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"no literal {name} in {module_file}")


@functools.lru_cache(maxsize=None)
def method_option_names() -> dict[str, list[str]]:
    """Every built-in method's option names (its config's dataclass fields, inherited ones first, and the former
    names of renamed ones), by method name,
    read from the source of ``objectives/`` without importing it.

    ``run`` checks a plan's field names with them before the engine (and torch) loads, so that a typo is refused at
    once; ``tests/test_cli_inputs.py`` checks that they equal the registry's. A config class names its method with
    ``method: ClassVar[str] = "name"``.
    """
    classes: dict[str, tuple[list[str], list[str], str | None]] = {}
    for path in sorted((_PACKAGE_DIR / "objectives").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            fields, method = [], None
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                if "ClassVar" not in ast.unparse(item.annotation):
                    fields.append(item.target.id)
                elif item.target.id == "method" and item.value is not None:
                    method = ast.literal_eval(item.value)
                elif item.target.id == "renamed_options" and item.value is not None:
                    fields.extend(ast.literal_eval(item.value))  # former names, still taken with a FutureWarning
            classes[node.name] = ([ast.unparse(b).rpartition(".")[2] for b in node.bases], fields, method)

    def fields_of(name: str) -> list[str]:
        bases, own, _ = classes.get(name, ([], [], None))
        inherited = [f for base in bases for f in fields_of(base)]
        return list(dict.fromkeys([*inherited, *own]))

    return {method: fields_of(name) for name, (_, _, method) in classes.items() if method}


def default_text(module_file: str, class_name: str, field: str, prefix: str = "default ") -> str:
    """``"default <value>"`` for a help text, or ``""`` when the default is not a literal."""
    defaults = dataclass_defaults(module_file, class_name)
    return f"{prefix}{defaults[field]}" if field in defaults else ""


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
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (also silences diffusers' and transformers' own loading bars)")


def set_quiet(quiet: bool) -> None:
    """Silence diffusers' and transformers' own progress bars (loading, saving) when asked."""
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def load(model: str, args: argparse.Namespace) -> Any:
    """The pipeline named on the command line (a world, a folder, a Hub id), its progress bars set by ``--quiet``."""
    from .._progress import phase

    quiet = getattr(args, "quiet", False)
    with phase(f"loading {model}", not quiet):
        from ..pipelines import load_pipeline

        set_quiet(quiet)
        pipe = load_pipeline(model, torch_dtype=getattr(args, "dtype", None), device=getattr(args, "device", None))
    pipe.set_progress_bar_config(disable=getattr(args, "quiet", False))
    return pipe


@contextlib.contextmanager
def working(desc: str, quiet: bool) -> Iterator[None]:
    """A labelled bar for one long step without progress of its own (writing a pipeline folder)."""
    from tqdm.auto import tqdm

    with tqdm(total=1, desc=desc, disable=quiet, leave=False, bar_format="{desc} ({elapsed})") as bar:
        yield
        bar.update(1)


def is_ledger_folder(path: Path) -> bool:
    """A folder written by ``save_unlearning`` / ``demo --out`` (ledger.json at the top, no pipeline)."""
    return (path / "ledger.json").is_file() and not (path / "model_index.json").is_file()


def load_folder(folder: str, model: str | None, args: argparse.Namespace) -> Any:
    """A pipeline for FOLDER: an unlearned pipeline folder loads as it is; a ledger folder is loaded onto ``--model``
    (the base it was made on)."""
    from . import UsageError

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if is_ledger_folder(path):
        if model is None:
            raise UsageError(f"{folder} holds a ledger without a pipeline: pass --model, the base it was made on "
                             f"({', '.join(world_names())}, a folder or a Hub id)")
        pipe = load(model, args)
        pipe.load_unlearning(path, replace=True)
        return pipe
    if model is not None:
        raise UsageError(f"--model is only for ledger folders; {folder} is a pipeline folder")
    return load(folder, args)


def check_writable(path: str | os.PathLike, flag: str = "--out", folder: bool = True) -> Path:
    """``path`` if it can be written (a folder, or a file when ``folder`` is False): it is one, or can be made in
    its nearest existing parent, which must be a writable folder. Checked before any work, so that a request is
    not computed only to fail on its output (``UsageError``, exit status 2)."""
    from . import UsageError

    target = Path(path)
    what = "folder" if folder else "file"
    if target.exists():
        if folder and not target.is_dir():
            raise UsageError(f"{flag} {target}: exists and is not a folder; choose a folder path")
        if not folder and target.is_dir():
            raise UsageError(f"{flag} {target}: is a folder; choose a file path")
    parent = target.parent if target.exists() else target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {target}: the {what} cannot be created, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {target}: the {what} cannot be written, {parent} is not writable")
    return target


def short(text: str, limit: int = 60) -> str:
    """A concept for one-line output: repr (so line breaks show as \\n) and at most ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
