"""Run a stream of removal requests from a plan YAML, resumably: stop it (Ctrl-C, a lost machine) and run the
same command again; the requests already in the output's ledger are checked against the plan and skipped.

    python examples/run_plan_stream.py examples/artist_stream.yaml
    python examples/run_plan_stream.py examples/artist_stream.yaml --stop-after 1   # simulate an interruption
    python examples/run_plan_stream.py examples/artist_stream.yaml                  # ... and resume

After every request the ledger and adapters are saved atomically in ``<output>/unlearning/``; at the end the whole
folded pipeline is written to ``<output>``. Tried on the CPU with the shipped MiniCanvas model::

    python examples/run_plan_stream.py examples/minicanvas_stream.yaml --output /tmp/stream --stop-after 1
    python examples/run_plan_stream.py examples/minicanvas_stream.yaml --output /tmp/stream
"""

from __future__ import annotations

import argparse
import sys


class StopAfter(Exception):
    """Raised after the asked number of requests, as an interruption would stop the run."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("plan", help="the plan YAML (model, output, defaults, requests)")
    parser.add_argument("--model", default=None, help="start from this model instead of the plan's")
    parser.add_argument("--output", default=None, help="write to this folder instead of the plan's")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after N newly trained requests, as an interruption would")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers_unlearn as du

    plan = du.load_plan(args.plan, model=args.model, output=args.output)  # every request checked before any runs
    print(f"{plan.source}: {len(plan.requests)} request(s) from {plan.model} into {plan.output}")
    trained = []

    def after_request(planned, record) -> None:
        trained.append(record.request_id)
        if args.stop_after is not None and len(trained) >= args.stop_after:
            raise StopAfter(f"stopped after {len(trained)} request(s) (the ledger in {plan.output} keeps them)")

    try:
        result = du.run_plan(plan, progress=not args.quiet, after_request=after_request)
    except StopAfter as stop:
        print(stop, "- run the same command again to resume", file=sys.stderr)
        return 3
    print(f"trained {result.trained or 'nothing'}, skipped {result.skipped or 'nothing'}; "
          f"{'wrote' if result.saved else 'kept'} {result.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
