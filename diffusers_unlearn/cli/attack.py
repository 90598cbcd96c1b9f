"""``diffusers-unlearn attack FOLDER --concept C --kind K``: does an erased concept come back?

Runs recovery attacks (``paraphrase``: held-out wordings; ``embedding``: a learned token embedding with frozen
weights; ``finetune``: benign fine-tuning on kept concepts, on a copy; ``rollback``: each other request rolled back
in turn) and prints, per attack, how often the classifier names the concept in the plain prompt's images and in the
attack's, with the UA before and under attack and what the attack cost. The pipeline on disk is not changed.

FOLDER is a ledger folder (``save_unlearning`` / ``demo --out``, loaded onto --model, default MiniCanvas), an
unlearned pipeline folder (``save_unlearned``), or a model name (``minicanvas``, ``tiny``) to attack the base model.
Images are judged by the MiniCanvas classifier of the domain, or by zero-shot CLIP from a local checkpoint (--clip).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import UsageError
from ._common import add_quiet, is_ledger_folder, load, set_quiet


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("attack", help="recovery attacks on an erased concept (held-out wordings, "
                                   "learned embedding, fine-tuning, rollback)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="FOLDER", help="a ledger folder, an unlearned pipeline folder, or "
                        "'minicanvas' / 'tiny' (the base model)")
    parser.add_argument("--concept", required=True, help="the concept to recover")
    parser.add_argument("--kind", required=True,
                        help="attack kind(s), comma-separated: paraphrase, embedding, finetune, rollback, or 'all'")
    parser.add_argument("--model", default=None,
                        help="base pipeline of a ledger folder: 'minicanvas' (default), 'tiny' or a pipeline folder")
    parser.add_argument("--domain", default=None,
                        help="prompt domain of the concept: style, object, ... (default: the ledger's record of it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack (default 0)")
    parser.add_argument("--eval-seeds", type=int, default=None,
                        help="images per prompt, the first N of MiniCanvas's EVAL_SEEDS (default 2)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="sampling steps of scored images (default 20)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 5.0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimisation steps of the embedding and finetune attacks (default 200 / 300)")
    parser.add_argument("--option", action="append", default=[], metavar="KIND.NAME=VALUE",
                        help="any other attack option, e.g. embedding.learning_rate=0.01 or finetune.rank=8 "
                        "(VALUE is read as JSON when it parses, else as text); repeatable")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="judge with zero-shot CLIP from this local checkpoint (labels: --labels)")
    parser.add_argument("--labels", default=None, help="comma-separated CLIP labels (default: MiniCanvas's of the "
                        "domain)")
    parser.add_argument("--weights-dir", default=None, help="MiniCanvas weights folder (default: the shipped one)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the full results as JSON")
    add_quiet(parser)
    parser.set_defaults(func=run)


def _kinds(text: str) -> list[str]:
    from ..evaluation import ATTACKS

    kinds = list(ATTACKS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ATTACKS]
    if unknown or not kinds:
        raise UsageError(f"unknown attack kind(s) {unknown or text!r}; allowed: {sorted(ATTACKS)} or 'all'")
    return list(dict.fromkeys(kinds))


def _options(args: argparse.Namespace, kinds: list[str]) -> dict[str, dict[str, Any]]:
    shared: dict[str, Any] = {"progress": not args.quiet}
    for key, value in (("seeds", args.eval_seeds), ("num_inference_steps", args.sampling_steps),
                       ("guidance_scale", args.guidance)):
        if value is not None:
            shared[key] = value
    per_kind = {k: dict(shared) for k in kinds}
    if args.steps is not None:
        for kind in ("embedding", "finetune"):
            if kind in per_kind:
                per_kind[kind]["steps"] = args.steps
    for item in args.option:
        key, sep, text = item.partition("=")
        kind, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--option must look like KIND.NAME=VALUE, got {item!r}")
        if kind not in per_kind:
            raise UsageError(f"--option {item!r} is for attack {kind!r}, which is not run (--kind {','.join(kinds)})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        per_kind[kind][name] = value
    return per_kind


def _load(args: argparse.Namespace) -> Any:
    from ..mixins.attach import attach

    def minicanvas() -> Any:
        from .. import minicanvas as mc

        set_quiet(args.quiet)
        pipe = attach(mc.load_pipeline(weights_dir=args.weights_dir))
        pipe.set_progress_bar_config(disable=args.quiet)
        return pipe

    if args.folder == "minicanvas":
        return minicanvas()
    path = Path(args.folder)
    if args.folder == "tiny" or not is_ledger_folder(path):
        if args.model is not None:
            raise UsageError(f"--model is only for ledger folders; {args.folder} is not one")
        if args.folder != "tiny" and not path.is_dir():
            raise FileNotFoundError(f"{args.folder} does not exist or is not a folder (nor 'minicanvas' / 'tiny')")
        return load(args.folder, args)
    pipe = minicanvas() if args.model in (None, "minicanvas") else load(args.model, args)
    pipe.load_unlearning(path, replace=True)
    return pipe


def _domain(pipe: Any, args: argparse.Namespace) -> str:
    if args.domain is not None:
        return args.domain
    from ..prompts import same_concept

    ledger = getattr(pipe, "unlearning_ledger", None)
    records = [r for r in ledger.requests if any(same_concept(c, args.concept) for c in r.concepts)] \
        if ledger is not None else []
    if records:
        return records[-1].domain
    from .. import minicanvas as mc

    for axis in ("style", "object"):
        if mc.eval_world().axis(args.concept, axis) is not None:
            return axis
    raise UsageError(f"cannot tell the domain of {args.concept!r} (not in the ledger): pass --domain")


def _classifier(args: argparse.Namespace, domain: str) -> Any:
    axis = domain.rsplit("-", 1)[-1]
    from .. import minicanvas as mc

    if args.clip:
        from ..evaluation import CLIPZeroShotClassifier

        if args.labels:
            labels = [n.strip() for n in args.labels.split(",") if n.strip()]
        elif axis in ("style", "object"):
            labels = list(mc.STYLES if axis == "style" else mc.OBJECTS)
        else:
            raise UsageError("--clip needs --labels for a domain other than style / object")
        return CLIPZeroShotClassifier(args.clip, labels)
    if axis not in ("style", "object"):
        raise UsageError(f"the MiniCanvas classifiers judge styles and objects, not domain {domain!r}: pass --clip")
    style_clf, object_clf = mc.load_classifiers(weights_dir=args.weights_dir)
    return style_clf if axis == "style" else object_clf


def table(results: list[Any]) -> list[str]:
    """Markdown rows: one per attack."""
    lines = ["| attack | plain accuracy | attack accuracy | UA | robust UA | steps | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kind} | {r.plain_accuracy:.1f} | {r.accuracy:.1f} | {r.plain_ua:.1f} | {r.robust_ua:.1f} "
                     f"| {r.steps} | {r.seconds:.1f} |")
    return lines


def run(args: argparse.Namespace) -> int:
    from .. import minicanvas as mc
    from ..evaluation import attack, eval_world_of

    kinds = _kinds(args.kind)
    options = _options(args, kinds)
    pipe = _load(args)
    domain = _domain(pipe, args)
    classifier = _classifier(args, domain)
    # the pipeline's world; a pipeline judged by MiniCanvas's classifiers is a MiniCanvas one (e.g. a saved folder)
    world = eval_world_of(pipe, domain) or (None if args.clip else mc.eval_world())
    results = []
    for kind in kinds:
        results.append(attack(pipe, args.concept, kind, domain=domain, classifier=classifier, seed=args.seed,
                              world=world, **options[kind]))
    removed = list(getattr(pipe, "removed_concepts", []) or [])
    print(f"concept {args.concept!r} ({domain}); removed concepts: {removed}")
    print("\n".join(table(results)))
    print("accuracy: percent of images the classifier names as the concept; UA = 100 - plain accuracy, "
          "robust UA = 100 - attack accuracy")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0
