"""``diffusers-unlearn eval FOLDER``: UnlearnCanvas's UA / IRA / CRA of an unlearned pipeline, plus K/V drift and cost.

FOLDER is a ledger folder (``pipe.save_unlearning`` / ``demo --out``), loaded onto MiniCanvas or onto --model, or a
pipeline folder (``save_unlearned``). The removed concepts and their domain come from the ledger (or --removed /
--domain). Images of every style x object prompt are judged by the MiniCanvas classifiers, or by zero-shot CLIP from
a local checkpoint (--clip) for real models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import UsageError
from ..worlds import world_names
from ._common import add_quiet, finite_float, is_ledger_folder, load, set_quiet


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="UA / IRA / CRA, drift and cost of an unlearned pipeline",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="FOLDER", help="a ledger folder or an unlearned pipeline folder")
    parser.add_argument("--model", default=None,
                        help=f"base pipeline of a ledger folder: a world name ({', '.join(world_names())}; default "
                        "minicanvas), a pipeline folder or a Hub id")
    parser.add_argument("--removed", default=None, help="comma-separated removed concepts (default: the ledger's)")
    parser.add_argument("--domain", choices=["style", "object"], default=None,
                        help="domain of the removed concepts (default: the ledger's)")
    parser.add_argument("--eval-seeds", type=int, default=None,
                        help="the first N evaluation seeds (default: all of MiniCanvas's EVAL_SEEDS)")
    parser.add_argument("--styles", default=None, help="comma-separated styles (default: MiniCanvas's)")
    parser.add_argument("--objects", default=None, help="comma-separated objects (default: MiniCanvas's)")
    parser.add_argument("--template", default=None,
                        help="prompt with {object} and {style} slots (default: MiniCanvas's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: MiniCanvas's)")
    parser.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default: MiniCanvas's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pipeline call (default 64)")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="judge with zero-shot CLIP from this local checkpoint instead of MiniCanvas's classifiers")
    parser.add_argument("--weights-dir", default=None, help="MiniCanvas weights folder (default: the shipped one)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    add_quiet(parser)
    parser.set_defaults(func=run)


def _load_pipeline(args: argparse.Namespace) -> Any:
    from ..mixins.attach import attach

    path = Path(args.folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{args.folder} does not exist or is not a folder")
    if not is_ledger_folder(path):
        if args.model is not None:
            raise UsageError(f"--model is only for ledger folders; {args.folder} is a pipeline folder")
        return load(args.folder, args)
    if args.model in (None, "minicanvas") and args.weights_dir is not None:
        from .. import minicanvas

        set_quiet(args.quiet)
        pipe = attach(minicanvas.load_pipeline(weights_dir=args.weights_dir))
        pipe.set_progress_bar_config(disable=args.quiet)
    else:
        pipe = load(args.model or "minicanvas", args)
    pipe.load_unlearning(path, replace=True)
    return pipe


def _removed_and_domain(pipe: Any, args: argparse.Namespace) -> tuple[list[str], str]:
    removed = _names(args.removed)
    records = pipe.unlearning_ledger.requests
    if removed is None:
        removed = [c for r in records for c in r.concepts]  # every concept of a request of several
    domain = args.domain
    if domain is None:
        # a benchmark world registers "<world>-style"; the built-in domains are "style" and "object"
        domains = {r.domain.rsplit("-", 1)[-1] for r in records}
        if len(domains) != 1 or not domains <= {"style", "object"}:
            raise UsageError(f"cannot tell the evaluation domain from the ledger's domains {sorted(domains)}: "
                             "pass --domain style|object (and --removed)")
        domain = domains.pop()
    return removed, domain


def run(args: argparse.Namespace) -> int:
    from .. import minicanvas
    from ..evaluation import CLIPZeroShotClassifier, evaluate_unlearning, kv_drift, request_costs

    overrides: dict[str, Any] = {"batch_size": args.batch_size}
    for key, value in (("styles", _names(args.styles)), ("objects", _names(args.objects)),
                       ("template", args.template), ("num_inference_steps", args.steps),
                       ("guidance_scale", args.guidance)):
        if value is not None:
            overrides[key] = value
    world = minicanvas.eval_world()
    config = world.eval_config(seeds=args.eval_seeds, **overrides)
    pipe = _load_pipeline(args)
    removed, domain = _removed_and_domain(pipe, args)
    if args.clip:
        style_clf = CLIPZeroShotClassifier(args.clip, config.styles)
        object_clf = CLIPZeroShotClassifier(args.clip, config.objects)
    else:
        style_clf, object_clf = world.load_classifiers(weights_dir=args.weights_dir)
    scores = evaluate_unlearning(pipe, removed, domain, style_clf, object_clf, config, progress=not args.quiet)
    drift = kv_drift(pipe)
    costs = request_costs(pipe)
    print(f"removed {domain}s: {removed}")
    print(scores.summary() + f"  K/V drift {drift:.4f}")
    width = max(len(c) for c in scores.accuracy)
    print(f"{domain} accuracy per {domain} (removed marked *):")
    for concept, accuracy in scores.accuracy.items():
        print(f"  {'*' if concept in removed else ' '} {concept:<{width}}  {accuracy:5.1f}")
    if costs:
        print(f"training cost: {sum(c['steps'] for c in costs)} steps, {sum(c['seconds'] for c in costs):.1f} s "
              f"over {len(costs)} request(s)")
    if args.json:
        Path(args.json).write_text(json.dumps({**scores.to_dict(), "drift": drift, "costs": costs}, indent=1,
                                              allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0
