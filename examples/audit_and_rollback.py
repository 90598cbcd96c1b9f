"""Audit one request of an unlearned pipeline and roll it back, keeping every other request.

    python examples/audit_and_rollback.py van-gogh-removed --request r0001 --prompt "a cafe at night in van gogh style"
    python examples/audit_and_rollback.py artist-stream-out --request r0002 --rollback --out artist-stream-minus-r0002

The audit grid shows the same prompt and seed on the base model, on every request, on that request alone and on all
but it, so a reviewer sees what this one request changed. ``--rollback`` then drops it (its adapter and its record)
and writes a new folder with the remaining requests folded in; the input folder is left as it was.

Tried on the CPU with the shipped MiniCanvas model, on a folder from remove_artist_style.py or run_plan_stream.py::

    python examples/audit_and_rollback.py /tmp/stream --request r0002 --prompt "a cat in ink wash style" \
        --steps 10 --rollback --out /tmp/stream-minus-r0002
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("folder", help="an unlearned pipeline folder (save_unlearned, run_plan)")
    parser.add_argument("--request", required=True, help="the request id to audit, e.g. r0001")
    parser.add_argument("--prompt", default=None, help="prompt of the audit grid (default: the request's first)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps of the audit images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="where to write the grid (default: audit-<request>.png)")
    parser.add_argument("--rollback", action="store_true", help="then drop the request and write --out")
    parser.add_argument("--out", default=None, help="the folder to write after --rollback (a new folder)")
    args = parser.parse_args(argv)
    if args.rollback and args.out is None:
        parser.error("--rollback needs --out: the folder to write the remaining requests to")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers_unlearn as du

    pipe = du.load_pipeline(args.folder)  # comes back with its ledger and adapters
    record = pipe.unlearning_ledger.get(args.request) if args.request in pipe.unlearning_ledger.ids() else None
    if record is None:
        raise SystemExit(f"no request {args.request!r} in {args.folder}; it holds {pipe.unlearning_ledger.ids()}")
    prompt = args.prompt or record.prompts[0]
    grid = pipe.audit_grid(args.request, prompt, num_inference_steps=args.steps, seed=args.seed)
    grid_path = Path(args.grid or f"audit-{args.request}.png")
    grid.save(grid_path)
    print(f"{args.request} removed {record.concept!r} ({record.method}, {record.steps} steps); audit grid of "
          f"{prompt!r}: {grid_path}")
    if args.rollback:
        dropped = pipe.rollback(args.request)
        folder = pipe.save_unlearned(args.out)
        print(f"rolled back {dropped.request_id} ({dropped.concept!r}); {folder} holds "
              f"{pipe.unlearning_ledger.ids() or 'no request'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
