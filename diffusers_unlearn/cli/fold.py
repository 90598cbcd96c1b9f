"""``diffusers-unlearn fold``: write the deployable folded pipeline folder, optionally rolling requests back.

FOLDER is an unlearned pipeline folder (re-folded in place unless --out) or a ledger folder written by
``save_unlearning`` / ``demo --out`` (then --model names the base it was made on, and --out is required).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (MODEL_HELP, add_loading_options, add_quiet, check_writable, is_ledger_folder, load_folder, short,
                      working)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fold", help="write the folded, deployable pipeline folder (and roll back requests)",
                                   description=__doc__)
    parser.add_argument("folder", metavar="FOLDER", help="an unlearned pipeline folder or a ledger folder")
    parser.add_argument("--out", default=None, help="where to write (default: FOLDER itself, for pipeline folders)")
    parser.add_argument("--model", default=None, help=f"base model of a ledger folder: {MODEL_HELP}")
    parser.add_argument("--rollback", action="append", default=[], metavar="REQUEST_ID",
                        help="drop this request before folding (re-folds the base with the rest); repeatable")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for the model card")
    add_loading_options(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import UsageError

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if args.out is None and is_ledger_folder(folder):
        raise UsageError(f"{folder} is a ledger folder: pass --out for the pipeline folder to write")
    out = check_writable(args.out) if args.out is not None else folder
    from ..publishing.export import check_output_folder
    from ..publishing.model_card import check_base_model
    from ..engine.state import check_request_id

    check_base_model(args.base_model)
    check_output_folder(out)
    pipe = load_folder(args.folder, args.model, args)
    for request_id in args.rollback:
        check_request_id(pipe, request_id)  # every id is checked before anything is dropped
    for request_id in args.rollback:
        record = pipe.rollback(request_id)
        resolved = pipe.unlearning_ledger.history[-1].get("resolved") or []
        again = f", re-solving the closed-form one(s) after it ({', '.join(resolved)})" if resolved else ""
        print(f"rolled back {request_id} ({short(record.concept)}): re-folded the base weights with the "
              f"{len(pipe.unlearning_ledger.requests)} remaining request(s){again}")
    with working(f"saving the folded pipeline to {out}", args.quiet):
        pipe.save_unlearned(out, base_model=args.base_model)
    print(f"saved the folded pipeline ({len(pipe.unlearning_ledger.requests)} request(s): "
          f"{', '.join(pipe.unlearning_ledger.ids()) or 'none'}) to {out}")
    return 0
