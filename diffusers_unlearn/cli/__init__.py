"""``diffusers-unlearn`` command line. Each subcommand is one module here with ``register(subparsers)``.

Exit status: 0 success, 2 bad usage or input, 1 failure. Errors print one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings

# Subcommand modules, in the order --help lists them.
COMMANDS = ("demo", "bench", "unlearn", "run", "eval", "fold", "audit", "push", "attack")


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


def _quiet_libraries() -> None:
    """transformers' warnings off (it warns that torchvision is absent when diffusers' pipelines import; nothing
    here needs it). Set through the environment, which transformers reads when it is first imported, so that an
    error in the arguments is reported without importing it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:  # already imported (main called from Python): set it there too
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()


def _bad_input(err: BaseException) -> bool:
    """Errors that report bad usage or input (exit status 2). The package's own kinds are looked up only where
    their modules are loaded already (they raised it), so reporting an argument error imports nothing heavy."""
    if isinstance(err, (UsageError, FileNotFoundError, ValueError, TypeError)):
        return True
    kinds = [getattr(sys.modules.get(f"{__package__.rpartition('.')[0]}.{module}"), name, None)
             for module, name in (("engine.ledger", "LedgerError"), ("engine.state", "UnknownRequestError"))]
    return any(isinstance(kind, type) and isinstance(err, kind) for kind in kinds)


# Library settings named by a warning (``UnlearnWarning.settings``) -> the flag of each subcommand that sets them.
SETTING_FLAGS = {
    "unlearn": {"neighbors": "--neighbors", "keep": "--retain", "steps": "--steps"},
    "bench": {"neighbors": "--gp-neighbors", "steps": "--steps"},
    "demo": {"steps": "--steps"},
}


def _warning_printer(command: str):
    """``warnings.showwarning`` for the command line: one line, the command's name, the flags that address it, no
    source line."""
    flags = SETTING_FLAGS.get(command, {})

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' API
        text = str(message)
        settings = getattr(message, "settings", {})
        named = [flags[key] + ("" if value in (None, [], ()) else f" (now {value})")
                 for key, value in settings.items() if key in flags]
        if named:
            text += f"; on the command line: {', '.join(named)}"
        elif settings and command == "run":
            text += f"; in the plan: {', '.join(settings)}"
        print(f"diffusers-unlearn {command}: warning: {text}", file=file or sys.stderr)

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusers-unlearn",
        description="Continual concept unlearning for diffusers pipelines: one constrained K/V adapter per "
        "removal request, recorded in a ledger.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()  # --help imports neither transformers nor torch, and neither does an argument error
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(args.command)
        try:
            result = args.func(args)
            return int(result or 0)
        except KeyboardInterrupt:
            print(f"diffusers-unlearn {args.command}: interrupted", file=sys.stderr)
            return 1
        except Exception as err:  # noqa: BLE001 - the command line reports any failure in one line
            if args.debug:
                traceback.print_exc()
            if _bad_input(err):
                print(f"diffusers-unlearn {args.command}: error: {err}", file=sys.stderr)
                return 2
            print(f"diffusers-unlearn {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1

if __name__ == "__main__":
    sys.exit(main())
