"""Step-time overhead of each regularizer against plain training, measured in one run.

    python scripts/regularizer_overhead.py [--model tiny|minicanvas] [--steps 600] [--repeats 2]

Times the training loop only (seconds per optimizer step, the ledger's ``timing.seconds_per_step``), after the
one-off setup (trajectories, importance scores, projectors), which the table lists apart. Variants are
interleaved and repeated; the median is reported. Frozen targets are memoised per trajectory point, so early steps
also pay first-visit frozen predictions; 600 steps make that share small (at 200 steps the ratios moved by +-10%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import table  # noqa: E402

import diffusers_unlearn as du  # noqa: E402


def variants():
    return {
        "plain": lambda: [],
        "L1Drift": lambda: [du.L1Drift(weight=10.0)],
        "L2Drift": lambda: [du.L2Drift(weight=1e3)],
        "SelectiveFinetune": lambda: [du.SelectiveFinetune(top_k=0.05)],
        "GradientProjection": lambda: [du.GradientProjection(keep=["monet"])],
        "GradientProjection+SelectiveFinetune": lambda: [du.GradientProjection(keep=["monet"]),
                                                         du.SelectiveFinetune(top_k=0.3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minicanvas"], default="tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "minicanvas":
        from diffusers_unlearn import minicanvas

        make, concept, domain = minicanvas.load_pipeline, "neon lines", "style"
    else:
        make, concept, domain = lambda: du.testing.tiny_pipeline(seed=0), "van gogh", "style"
    per_step: dict[str, list[float]] = {name: [] for name in variants()}
    setup: dict[str, list[float]] = {name: [] for name in variants()}
    for _ in range(args.repeats):
        for name, regs in variants().items():
            pipe = du.attach(make())
            pipe.set_progress_bar_config(disable=True)
            record = pipe.unlearn(concept, domain=domain, steps=args.steps, seed=0, learning_rate=1e-3,
                                  sampling_steps=20, regularizers=regs())
            per_step[name].append(record.timing["seconds_per_step"])
            setup[name].append(record.timing["setup_seconds"])
    base = statistics.median(per_step["plain"])
    rows = []
    for name in variants():
        step = statistics.median(per_step[name])
        rows.append([name, f"{step * 1000:.2f}", f"{step / base:.3f}", f"{(step / base - 1) * 100:+.1f}%",
                     f"{statistics.median(setup[name]):.2f}"])
    print(f"{args.model} pipeline, {args.steps} steps x {args.repeats} repeats, {args.threads} thread(s)\n")
    print(table(rows, ["regularizer", "ms/step", "ratio to plain", "overhead", "one-off setup s"]))


if __name__ == "__main__":
    main()
