"""A stream of removals through the public API, scored on concepts nobody named: the retention issue's regimes.

    # nothing named: pipe.unlearn(style, domain="style") and nothing else, the bench's order and its reverse
    python scripts/api_stream.py --out docs/bench/api-nothing-named
    python scripts/api_stream.py --reverse --out docs/bench/api-nothing-named-reversed
    # a protected half named: the kept styles of the first 6 families and 6 objects passed as keep=; scored on
    # the other families' kept styles and the other objects
    python scripts/api_stream.py --half-named --out docs/bench/api-half-named
    # another recipe: any unlearn() keyword as JSON, e.g. a bounded closed form
    python scripts/api_stream.py --set method='"closed_form"' --set ridge=0.01

Each request is ``pipe.unlearn(style, domain="style", **options)`` on the shipped MiniCanvas model; the styles are
the bench's removal order (one per family). After the last request (and, with ``--every``, after each) it scores,
on MiniCanvas's classifiers and ``--eval-seeds`` seeds: UA, held-out UA, IRA and CRA over the scored concepts
(never one that was passed as keep=), objects kept in the removed styles' prompts, kept-image change against the
base in seed gaps, and a Fréchet distance of the kept images' classifier features. Prints a JSON summary and writes
it to ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--reverse", action="store_true", help="remove in the reverse of the bench's order")
    parser.add_argument("--half-named", action="store_true",
                        help="pass the kept styles of the first 6 families and 6 objects as keep=")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="an unlearn() keyword")
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--every", action="store_true", help="score after every request, not only the last")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    import diffusers_unlearn as du
    from diffusers_unlearn.bench.heldout import heldout_unlearning
    from diffusers_unlearn.bench.world import minicanvas_world
    from diffusers_unlearn.evaluation import EvalReference, evaluate_unlearning, kv_drift

    torch.set_num_threads(args.threads)
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    world = minicanvas_world(eval_seeds=args.eval_seeds, eval_steps=args.eval_steps)
    stream = world.stream("style", args.requests)
    if args.reverse:
        stream = stream[::-1]
    keep: dict[str, list[str]] | None = None
    scored_styles = list(world.eval_config.styles)
    scored_objects = list(world.eval_config.objects)
    if args.half_named:
        mc = du.minicanvas
        families = list(mc.STYLE_FAMILIES.values())
        named_styles = [s for members in families[:6] for s in members if s not in stream]
        # the objects the evaluation does not draw, then others, up to 6; the rest are scored
        named_objects = [o for o in mc.OBJECTS if o not in scored_objects][:6]
        keep = {"style": named_styles, "object": named_objects}
        scored_styles = [s for s in scored_styles if s not in named_styles]
    config = world.eval_config
    config = type(config)(**{**config.to_dict(), "styles": scored_styles, "objects": scored_objects})
    if keep is not None:
        overlap = set(keep["style"] + keep["object"]) & set(scored_styles + scored_objects)
        assert not overlap, overlap  # protected and scored must be disjoint

    pipe = du.attach(world.load_pipeline())
    base = evaluate_unlearning(pipe, [], "style", world.style_classifier, world.object_classifier, config,
                               progress=False)
    reference = EvalReference.from_images(base.images, world.feature_extractor)
    rows = [{"request": 0, **{k: v for k, v in base.to_dict().items() if k not in ("config", "accuracy",
                                                                                 "cross_accuracy")}}]
    print(f"base: {base.summary()}", flush=True)
    request_seconds = []
    for k, style in enumerate(stream):
        started = time.perf_counter()
        record = pipe.unlearn(style, domain="style", seed=k, progress=False,
                              **({"keep": keep} if keep else {}), **options)
        request_seconds.append(time.perf_counter() - started)
        if not args.every and k < len(stream) - 1:
            print(f"request {k + 1} {style!r}: {request_seconds[-1]:.1f}s", flush=True)
            continue
        removed = stream[: k + 1]
        scores = evaluate_unlearning(pipe, removed, "style", world.style_classifier, world.object_classifier, config,
                                     progress=False, reference=reference, feature_extractor=world.feature_extractor)
        heldout = heldout_unlearning(pipe, world, removed, "style")
        row = {"request": k + 1, "concept": style, "method": record.method,
               **{k_: v for k_, v in scores.to_dict().items() if k_ not in ("config",)},
               "ua_heldout": None if heldout is None else heldout["ua"], "drift": kv_drift(pipe),
               "request_seconds": round(request_seconds[-1], 2)}
        rows.append(row)
        print(f"request {k + 1} {style!r}: {scores.summary()}  held-out UA {row['ua_heldout']}  "
              f"drift {row['drift']:.3f}  {request_seconds[-1]:.1f}s", flush=True)
    final = rows[-1]
    # the base model's objects in the same removed styles' prompts: what "kept in removed" is compared with
    base_removed = evaluate_unlearning(None, stream, "style", world.style_classifier, world.object_classifier, config,
                                       images=base.images).cross_removed
    summary = {
        "command": "python scripts/api_stream.py " + " ".join(
            (["--reverse"] if args.reverse else []) + (["--half-named"] if args.half_named else [])
            + [f"--set {s}" for s in args.set] + [f"--eval-seeds {args.eval_seeds}", f"--requests {args.requests}"]),
        "stream": stream, "keep": keep, "scored": {"style": scored_styles, "object": scored_objects},
        "options": options, "base": rows[0], "rows": rows,
        "ratios": {"ira": _ratio(final.get("ira"), base.ira), "cra": _ratio(final.get("cra"), base.cra),
                              "kept_in_removed": _ratio(final.get("cross_removed"), base_removed)},
        "base_kept_in_removed": base_removed,
        "max_request_seconds": round(max(request_seconds), 2),
    }
    print(json.dumps({k: summary[k] for k in ("ratios", "max_request_seconds")}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return 0


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 3)


if __name__ == "__main__":
    raise SystemExit(main())
