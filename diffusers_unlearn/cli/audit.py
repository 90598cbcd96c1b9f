"""``diffusers-unlearn audit``: one prompt, one seed, four panels: base, all requests, only one, all but it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import MODEL_HELP, add_loading_options, add_quiet, check_writable, finite_float, load_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("audit", help="image grid: base / all requests / only one / all but it",
                                   description=__doc__)
    parser.add_argument("folder", metavar="FOLDER", help="an unlearned pipeline folder or a ledger folder (+ --model)")
    parser.add_argument("--request", required=True, metavar="ID", help="the request to audit, e.g. r0002")
    parser.add_argument("--prompt", required=True, help="the prompt to render")
    parser.add_argument("--out", default=None, help="PNG file to write (default: audit-<ID>.png)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared initial noise (default 0)")
    parser.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--model", default=None, help=f"base model of a ledger folder: {MODEL_HELP}")
    add_loading_options(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import UsageError
    from ..engine.state import check_request_id

    out = Path(args.out or f"audit-{args.request}.png")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, got {str(out)!r}")
    check_writable(out, folder=False)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    pipe = load_folder(args.folder, args.model, args)
    check_request_id(pipe, args.request)
    grid = pipe.audit_grid(args.request, args.prompt, num_inference_steps=args.steps, seed=args.seed,
                           guidance_scale=args.guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out}: base | all {len(pipe.unlearning_ledger.requests)} request(s) / only {args.request} | "
          f"all but {args.request}")
    return 0
