"""Inference time after a stream of requests: base pipeline, the requests folded, the requests stacked.

    python scripts/inference_overhead.py [--model tiny|minicanvas] [--requests 12] [--repeats 5]

Folded requests are plain nn.Linear weights (the base's own modules), so they must cost exactly what the base
costs; stacked requests are one peft LoRA branch per request on every K/V layer. Times whole pipeline calls
(batch of prompts, fixed steps), interleaved and repeated; reports medians and ratios to the base.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import table  # noqa: E402

import diffusers_unlearn as du  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minicanvas"], default="tiny")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "minicanvas":
        from diffusers_unlearn import minicanvas

        make, prompt = minicanvas.load_pipeline, minicanvas.prompt(minicanvas.STYLES[0], minicanvas.OBJECTS[0])
        concepts = list(minicanvas.STYLES)
    else:
        make, prompt = (lambda: du.testing.tiny_pipeline(seed=0)), "a painting in van gogh style"
        concepts = list(du.vocabulary.DEFAULT_VOCABULARY["style"])
    base = make()
    base.set_progress_bar_config(disable=True)
    pipe = du.attach(make())
    pipe.set_progress_bar_config(disable=True)
    for i, concept in enumerate(concepts[: args.requests]):  # a few steps each: only the adapters' shape matters
        pipe.unlearn(concept, domain="style", steps=2, seed=i, sampling_steps=4, num_trajectories=1, progress=False)

    def call(p) -> float:
        started = time.perf_counter()
        p([prompt] * args.batch, num_inference_steps=args.inference_steps,
          generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"base": [], f"{args.requests} folded": [], f"{args.requests} stacked": []}
    call(base)  # warm-up
    for _ in range(args.repeats):
        times["base"].append(call(base))
        pipe.fold()
        times[f"{args.requests} folded"].append(call(pipe))
        pipe.unfold()
        times[f"{args.requests} stacked"].append(call(pipe))
    reference = statistics.median(times["base"])
    rows = [[name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / reference:.3f}"]
            for name, t in times.items()]
    print(f"{args.model} pipeline, batch {args.batch}, {args.inference_steps} steps, {args.repeats} repeats, "
          f"{args.threads} thread(s)\n")
    print(table(rows, ["pipeline", "seconds per call (median)", "ratio to base"]))


if __name__ == "__main__":
    main()
