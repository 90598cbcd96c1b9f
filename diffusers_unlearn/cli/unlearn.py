"""``diffusers-unlearn unlearn``: remove one concept from a model or an unlearned folder and save the result."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import MODEL_HELP, add_loading_options, add_quiet, load, short


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "unlearn", help="remove one concept and save the unlearned pipeline folder", description=__doc__,
        epilog="example: diffusers-unlearn unlearn tiny --concept 'van gogh' --domain style --retain monet --out out/",
    )
    parser.add_argument("model", metavar="MODEL_OR_FOLDER", help=MODEL_HELP)
    parser.add_argument("--concept", required=True, help="the concept to remove, e.g. 'van gogh'")
    parser.add_argument("--out", required=True,
                        help="folder to write the unlearned pipeline to (new, empty, or an unlearned folder; "
                             "MODEL_OR_FOLDER itself updates it)")
    parser.add_argument("--method", default="esd", help="erasure method: esd (default), ca, or a registered one")
    parser.add_argument("--anchor", default=None, help="anchor concept (method ca)")
    parser.add_argument("--domain", default=None, help="style, object or concept (default): picks the prompt templates")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: TrainingConfig's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="learning rate")
    parser.add_argument("--rank", default=None, help="LoRA rank, or 'full'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request (default 0)")
    parser.add_argument("--retain", action="append", default=None, metavar="CONCEPTS",
                        help="concepts to keep with gradient projection, comma-separated; repeatable")
    parser.add_argument("--neighbors", type=int, default=None,
                        help="gradient projection also keeps this many concepts most similar to the target")
    parser.add_argument("--project", action="store_true",
                        help="gradient projection with its defaults (implied by --retain / --neighbors)")
    parser.add_argument("--top-k", type=float, default=None, help="selective fine-tuning: fraction of K/V elements")
    parser.add_argument("--l1", type=float, default=None, help="L1 drift penalty weight")
    parser.add_argument("--l2", type=float, default=None, help="L2 drift penalty weight")
    parser.add_argument("--strategy", default=None,
                        help="sequential (default), merge, ties, task_arithmetic or uniform (one per ledger)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the method's config, e.g. sampling_steps=20; repeatable")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for the model card")
    add_loading_options(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def parse_options(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs; values read as YAML scalars (numbers, booleans, lists), else as text."""
    import yaml

    from ..cli import UsageError
    from ..plan import _PlanLoader

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.load(value, Loader=_PlanLoader) if value else ""  # noqa: S506
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def build_regularizers(args: argparse.Namespace) -> list:
    import diffusers_unlearn as du

    regularizers = []
    retain = [c.strip() for value in (args.retain or []) for c in value.split(",") if c.strip()]
    if args.project or args.retain or args.neighbors is not None:
        settings = {"retain": retain}
        if args.neighbors is not None:
            settings["neighbors"] = args.neighbors
        regularizers.append(du.GradientProjection(**settings))
    if args.top_k is not None:
        regularizers.append(du.SelectiveFinetune(top_k=args.top_k))
    if args.l1 is not None:
        regularizers.append(du.L1Drift(weight=args.l1))
    if args.l2 is not None:
        regularizers.append(du.L2Drift(weight=args.l2))
    return regularizers


def _rank(value: str | None) -> int | str | None:
    from ..cli import UsageError

    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--rank must be an integer or 'full', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..export import check_output_folder
    from ..model_card import check_base_model
    from ..request import UnlearnRequest

    check_base_model(args.base_model)
    options = parse_options(args.option)
    if args.anchor is not None:
        options["anchor"] = args.anchor
    regularizers = build_regularizers(args)  # bad settings fail here, before the model loads
    rank = _rank(args.rank)
    # the whole request is checked here, before the model loads
    request = UnlearnRequest.build(
        args.concept, args.method, domain=args.domain, steps=args.steps, seed=args.seed, regularizers=regularizers,
        strategy=args.strategy, rank=rank, learning_rate=args.learning_rate, **options,
    )
    out = Path(args.out)
    check_output_folder(out)
    pipe = load(args.model, args)
    before = len(pipe.unlearning_ledger.requests)
    record = pipe.unlearn(request, progress=not args.quiet)
    print(f"removed {short(record.concept)} as {record.request_id} in {record.seconds:.1f}s "
          f"(final loss {record.final_loss:.4g}; {before} earlier request(s))")
    pipe.save_unlearned(out, base_model=args.base_model)
    print(f"saved the unlearned pipeline ({len(pipe.unlearning_ledger.requests)} request(s) folded) to {out}")
    return 0
