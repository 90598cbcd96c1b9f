"""Base-model quality of MiniCanvas: style and object accuracy of its own generations.

``python -m diffusers_unlearn.minicanvas.quality`` generates every style x object prompt at each of ``EVAL_SEEDS``
with the recommended sampling settings and prints the accuracy of the shipped classifiers on them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..images import generate_images, to_pil
from . import data as mc_data
from . import settings
from . import weights as mc_weights

__all__ = ["evaluate_weights", "measure_quality", "sample_grid"]


def measure_quality(pipe, style_classifier, object_classifier, seeds: Sequence[int] = tuple(settings.EVAL_SEEDS),
                    styles: Sequence[str] | None = None, objects: Sequence[str] | None = None,
                    num_inference_steps: int = settings.NUM_INFERENCE_STEPS,
                    guidance_scale: float = settings.GUIDANCE_SCALE, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy of both classifiers on the pipeline's images of every style x object prompt and seed."""
    styles = list(styles or mc_data.STYLES)
    objects = list(objects or mc_data.OBJECTS)
    triples = [(s, o, seed) for seed in seeds for s in styles for o in objects]
    prompts = [mc_data.prompt(s, o) for s, o, _ in triples]
    t0 = time.time()
    images = generate_images(pipe, prompts, [t[2] for t in triples], num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, batch_size=batch_size, progress=False)
    seconds = time.time() - t0
    pred_style = style_classifier(images)
    pred_object = object_classifier(images)
    ok_s = [p == t[0] for p, t in zip(pred_style, triples)]
    ok_o = [p == t[1] for p, t in zip(pred_object, triples)]

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "style_accuracy": mean(ok_s),
        "object_accuracy": mean(ok_o),
        "per_style": {s: mean([ok for ok, t in zip(ok_s, triples) if t[0] == s]) for s in styles},
        "per_object": {o: mean([ok for ok, t in zip(ok_o, triples) if t[1] == o]) for o in objects},
        "num_images": len(triples),
        "seeds": list(seeds),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generation_seconds": round(seconds, 2),
    }


def evaluate_weights(weights_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """Load (verified) pipeline and classifiers from ``weights_dir`` and run :func:`measure_quality`."""
    pipe = mc_weights.load_pipeline_from(weights_dir, device=device)
    style_clf, object_clf = mc_weights.load_classifiers_from(weights_dir, device=device, verify=False)
    return measure_quality(pipe, style_clf, object_clf, **kwargs)


def sample_grid(pipe, seed: int = settings.EVAL_SEEDS[0], scale: int = 3, **kwargs: Any):
    """A PIL image: one generation per style (rows) and object (columns), for looking at the model."""
    from PIL import Image

    prompts = [mc_data.prompt(s, o) for s in mc_data.STYLES for o in mc_data.OBJECTS]
    kwargs = {"num_inference_steps": settings.NUM_INFERENCE_STEPS, "guidance_scale": settings.GUIDANCE_SCALE,
              "progress": False, **kwargs}
    images = to_pil(generate_images(pipe, prompts, [seed] * len(prompts), **kwargs))
    w, h = images[0].size
    cols = len(mc_data.OBJECTS)
    grid = Image.new("RGB", (cols * w, len(mc_data.STYLES) * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the quality report as JSON."""
    p = argparse.ArgumentParser(prog="python -m diffusers_unlearn.minicanvas.quality", description=__doc__)
    p.add_argument("--weights-dir", default=None, help="weights folder (default: the shipped one)")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=settings.NUM_INFERENCE_STEPS)
    p.add_argument("--guidance", type=float, default=settings.GUIDANCE_SCALE)
    p.add_argument("--seeds", type=int, nargs="+", default=list(settings.EVAL_SEEDS))
    p.add_argument("--record", action="store_true", help="store the result in the weights manifest")
    p.add_argument("--grid", default=None, metavar="PNG", help="also save a style x object grid of samples")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.grid:
        pipe = mc_weights.load_pipeline_from(args.weights_dir, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        sample_grid(pipe, seed=args.seeds[0], num_inference_steps=args.steps,
                    guidance_scale=args.guidance).save(args.grid)
    result = evaluate_weights(args.weights_dir, device=args.device, seeds=args.seeds,
                              num_inference_steps=args.steps, guidance_scale=args.guidance)
    if args.record:
        mc_weights.record_quality(args.weights_dir or mc_weights.DEFAULT_WEIGHTS_DIR, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
