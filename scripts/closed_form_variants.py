"""Closed-form settings on MiniCanvas: one request alone on chosen styles, or the bench's 12-request stream.

    # one request on each style, from the base model
    python scripts/closed_form_variants.py --concepts "forest hatching,ocean waves,candy checks,neon lines" \\
        --set negative_guidance=2 --set protection='"soft"'
    # the same, evaluated on chosen styles with more seeds (here: a style and its neighbours, 5 seeds)
    python scripts/closed_form_variants.py --concepts "forest hatching" --eval-seeds 5 \\
        --eval-styles "forest hatching,forest rings,metal hatching,ember lines" --set negative_guidance=2
    # the stream (the bench's closed_form protocol with these settings over its defaults)
    python scripts/closed_form_variants.py --requests 12 --set concept_weight=10
    # the six-object stream of ``bench --domain object``
    python scripts/closed_form_variants.py --domain object --requests 6 --set keep_weight=5

Evaluation as ``diffusers-unlearn bench --eval-seeds 1 --eval-steps 10``: 96 images (24 styles x 4 objects x 1 seed,
10 DDIM steps); with --concepts, ``--eval-seeds`` and ``--eval-styles`` change it. ``--set KEY=JSON`` sets a
``ClosedFormConfig`` field over the bench's (repeatable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=None,
                        help="comma-separated styles (objects with --domain object), each removed alone from the base")
    parser.add_argument("--domain", choices=("style", "object"), default="style",
                        help="what the requests remove (object: the bench's --domain object world and stream)")
    parser.add_argument("--requests", type=int, default=12, help="stream length when --concepts is not given")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-seeds", type=int, default=1, help="with --concepts: evaluation seeds (first N)")
    parser.add_argument("--eval-styles", default=None,
                        help="with --concepts: comma-separated styles to evaluate (default: the bench's 24)")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        try:
            overrides[key] = json.loads(value) if sep and key else parser.error(f"--set {item!r}: expected KEY=JSON")
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: the value is not JSON (strings need quotes: protection='\"soft\"')")

    import torch

    torch.set_num_threads(args.threads)
    from diffusers_unlearn.bench import PROTOCOLS, BenchSettings, minicanvas_world
    from diffusers_unlearn.bench import runner
    from diffusers_unlearn.evaluation import evaluate_unlearning, kv_drift
    from diffusers_unlearn.mixins.attach import attach
    from diffusers_unlearn.objectives import build_objective_config

    world = minicanvas_world(eval_seeds=args.eval_seeds if args.concepts else 1, eval_steps=10, domain=args.domain)
    if args.concepts and args.eval_styles:
        styles = [c.strip() for c in args.eval_styles.split(",") if c.strip()]
        world.eval_config = dataclasses.replace(world.eval_config, styles=styles)
    settings = BenchSettings(requests=args.requests, domain=args.domain)
    protocol = PROTOCOLS["closed_form"]

    original = runner._objective

    def with_overrides(*args, **kwargs):
        built = original(*args, **kwargs)
        options = {k: v for k, v in built.to_dict().items() if k != "method"}
        return build_objective_config(built.method, {**options, **overrides})

    runner._objective = with_overrides  # the bench's own request path, with these settings
    print(f"closed_form settings over the bench's: {overrides or 'none'}", flush=True)
    if args.concepts:
        for concept in [c.strip() for c in args.concepts.split(",") if c.strip()]:
            pipe = attach(world.load_pipeline())
            pipe.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            record = pipe.unlearn(**runner.request_kwargs(world, settings, protocol, concept), seed=0, progress=False)
            seconds = time.perf_counter() - start
            scores = evaluate_unlearning(pipe, [concept], args.domain, world.style_classifier, world.object_classifier,
                                         world.eval_config, progress=False)
            accuracy = ", ".join(f"{c} {a:.0f}" for c, a in scores.accuracy.items())
            check = record.erasure or {}
            print(f"{concept!r}: {scores.summary()}  drift {kv_drift(pipe):.2f}  request {seconds:.1f}s  "
                  f"erasure check: shift {check.get('target_shift')}, erased {check.get('erased')}", flush=True)
            print(f"  accuracy: {accuracy}", flush=True)
        return 0

    pipe = attach(world.load_pipeline())
    base = runner._evaluate(world, settings, pipe, [], False)
    base_row = runner._row(0, None, base, 0.0, 0, 0.0, 0, 0.0)
    print(f"base model: {base.summary()}", flush=True)
    rows = runner.run_protocol(world, settings, protocol, base_row, progress=False, log=lambda m: print(m, flush=True))
    last = rows[-1]
    removed_ua = {row["concept"]: 100 - last["accuracy"][row["concept"]] for row in rows[1:]}
    worst = min(removed_ua, key=removed_ua.get)
    print(f"after request {last['request']}: each removed {args.domain}'s UA {removed_ua}; lowest {removed_ua[worst]:.1f} "
          f"({worst!r})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
