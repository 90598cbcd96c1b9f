"""``diffusers-unlearn run PLAN.yaml``: run a stream of removal requests; a rerun resumes where it stopped.

After every request the ledger is saved in OUT/unlearning/; at the end OUT is the folded pipeline folder. A rerun
skips the requests the ledger already holds (and refuses a plan whose first requests differ from the ledger).
The plan is a YAML map: 'model' (a world name, a folder or a Hub id), 'output' (the folder to write), optional
'defaults' (fields every request gets), 'strategy', 'base_model', 'torch_dtype', 'device', and 'requests', a list of
maps with 'concept' (a string, or a list of concepts that one request removes) and optionally 'domain', 'method',
'seed', 'regularizers' (names or {name: ..., settings}),
'strategy', 'prompts', 'templates', training settings ('steps', 'learning_rate', 'rank', 'batch_size', ...) and any
option of the method ('anchor', 'negative_guidance', ...). A misspelled field is refused with the allowed ones.
"""

from __future__ import annotations

import argparse

from ._common import MODEL_HELP, add_quiet, check_writable, method_option_names, set_quiet

EXAMPLE = """example PLAN.yaml:
  model: tiny                # a world name (minicanvas, tiny, ...), a folder (relative to the plan) or a Hub id
  output: out/               # relative to the plan
  defaults: {method: esd, steps: 200, learning_rate: 1.0e-4}
  requests:
    - concept: van gogh
      domain: style
      regularizers: [{name: gradient_projection, retain: [monet]}, {name: l2_drift, weight: 1000}]
    - {concept: cat, domain: object, method: ca, anchor: dog}
    - {concept: [monet, picasso], domain: style}   # one request removing both
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a PLAN.yaml stream of requests (resumable)", description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("plan", metavar="PLAN.yaml", help="the plan file")
    parser.add_argument("--model", default=None,
                        help=f"start from this model instead of the plan's 'model': {MODEL_HELP}")
    parser.add_argument("--out", default=None, help="write here instead of the plan's 'output'")
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..plan_format import check_plan_fields, read_plan_file

    # the plan's shape and field names first, without the engine: a typo is refused at once
    data = read_plan_file(args.plan)
    check_plan_fields(data, source=args.plan, method_fields=method_option_names().get)
    from ..plan import parse_plan, run_plan

    plan = parse_plan(data, source=args.plan, base_dir=Path(args.plan).parent, model=args.model, output=args.out)
    check_writable(plan.output, "output" if args.out is None else "--out")
    set_quiet(args.quiet)
    print(f"plan {args.plan}: {len(plan.requests)} request(s) on {plan.model} -> {plan.output}")
    result = run_plan(plan, progress=not args.quiet)
    print(f"done: {len(result.trained)} trained, {len(result.skipped)} already in the ledger; "
          f"removed concepts: {result.pipe.removed_concepts}")
    return 0
