"""Evaluation throughput: ``evaluation.generate_images`` against a plain diffusers pipeline call, side by side.

    python scripts/eval_throughput.py [--images 128] [--batch-sizes 1,8,32,64,128] [--threads 2]

On the shipped MiniCanvas (its evaluation sampling: ``NUM_INFERENCE_STEPS`` DDIM steps, ``GUIDANCE_SCALE``), times
``pipe(prompts, generator=..., output_type="pt")`` at each batch size, then ``generate_images`` (one seed per
image, as the bench calls it) at the bench's batch size and at the plain call's best, and the style classifier on
the same images. Each variant runs ``--repeats`` times, interleaved; the best time of each is kept (least disturbed
by other load). Prints images per second and the ratio to the plain call at its best batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-sizes", default="8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers_unlearn as du
    from diffusers_unlearn import minicanvas as mc
    from diffusers_unlearn.bench.world import minicanvas_world
    from diffusers_unlearn.evaluation import classify, generate_images

    pipe = du.attach(mc.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    style_classifier, _ = mc.load_classifiers()
    bench_batch = minicanvas_world().eval_config.batch_size
    pairs = [(s, o) for s in mc.STYLES for o in mc.OBJECTS][: args.images]
    prompts = [mc.prompt(s, o) for s, o in pairs]
    seeds = list(range(len(prompts)))
    sampling = dict(num_inference_steps=mc.NUM_INFERENCE_STEPS, guidance_scale=mc.GUIDANCE_SCALE)
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    def plain(batch: int) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch):
            gen = torch.Generator().manual_seed(start)
            out.append(pipe(prompts[start:start + batch], generator=gen, output_type="pt", **sampling).images)
        return torch.cat(out)

    def ours(batch: int) -> torch.Tensor:
        return generate_images(pipe, prompts, seeds, batch_size=batch, progress=False, **sampling)

    best: dict[str, float] = {}

    def timed(name: str, fn, *fn_args) -> torch.Tensor:
        started = time.perf_counter()
        out = fn(*fn_args)
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
        return out

    images = None
    for _ in range(args.repeats):  # interleaved: each variant sees the same machine
        for batch in sizes:
            timed(f"plain pipeline call, batch {batch}", plain, batch)
            images = timed(f"generate_images, batch {batch}", ours, batch)
        timed("style classifier", classify, style_classifier, images)

    n = len(prompts)

    def rate(kind: str, batch: int) -> float:
        return n / best[f"{kind}, batch {batch}"]

    plain_best = max(sizes, key=lambda b: rate("plain pipeline call", b))
    ours_best = max(sizes, key=lambda b: rate("generate_images", b))
    reference = rate("plain pipeline call", plain_best)
    rows = [[name, f"{seconds:.2f}", f"{n / seconds:.1f}", f"{n / seconds / reference:.2f}"]
            for name, seconds in best.items() if name != "style classifier"]
    print(f"MiniCanvas evaluation sampling ({mc.NUM_INFERENCE_STEPS} DDIM steps, guidance {mc.GUIDANCE_SCALE}, "
          f"{mc.RESOLUTION} px), {n} images, {args.threads} thread(s), best of {args.repeats} "
          f"(torch {torch.__version__})\n")
    print(table(rows, ["variant", "seconds", "images/s", "vs plain at its best batch"]))
    print(f"\ngenerate_images at its best batch size ({ours_best}) / plain call at its best ({plain_best}): "
          f"{rate('generate_images', ours_best) / reference:.2f}x (goal >= 0.95x); at the bench's batch size "
          f"({bench_batch}): {rate('generate_images', bench_batch) / reference:.2f}x"
          if bench_batch in sizes else "")
    bench_images_s = best.get(f"generate_images, batch {bench_batch}", best[f"generate_images, batch {ours_best}"])
    print(f"classification: {best['style classifier'] / bench_images_s:.1%} of the generation time "
          f"({n / best['style classifier']:.0f} images/s)")


if __name__ == "__main__":
    main()
