"""``diffusers-unlearn demo``: remove two concepts in sequence and show the ledger."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="remove two concepts in sequence on a tiny offline pipeline",
                                   description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="training steps per request (default 30)")
    parser.add_argument("--out", default=None, help="also save the ledger and adapters to this directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import diffusers_unlearn as du

    torch.manual_seed(0)
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=args.quiet)
    for concept, domain, regularizers in (
        ("van gogh", "style", [du.GradientProjection(retain=["monet"])]),
        ("dog", "object", [du.GradientProjection(), du.L2Drift(weight=1e3)]),
    ):
        record = pipe.unlearn(concept, domain=domain, steps=args.steps, seed=0, learning_rate=3e-3,
                              sampling_steps=10, regularizers=regularizers)
        print(f"removed {record.concept!r} as {record.request_id} in {record.seconds:.1f}s (loss {record.final_loss:.4g})")
    print(json.dumps([r.to_dict() for r in pipe.unlearning_ledger.requests], indent=2, default=str)[:4000])
    print("removed concepts:", pipe.removed_concepts)
    if args.out:
        pipe.save_unlearning(args.out)
        print(f"saved ledger and adapters to {args.out}")
    return 0
