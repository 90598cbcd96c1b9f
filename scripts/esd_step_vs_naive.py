"""Time per ESD training step and peak memory: this design against the naive baseline, side by side.

    python scripts/esd_step_vs_naive.py [--model tiny|minicanvas] [--steps 60] [--sampling-steps 50]

This design: one UNet (the frozen model is the same UNet with the adapter disabled), trajectories sampled once per
request and reused, frozen targets memoised. Baseline (scripts/naive_esd.py): a second frozen UNet copy and a
fresh rollout every step. Each variant runs in its own process; peak memory is that process's peak RSS above what
it held once the pipeline was built. Prints a Markdown table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import load, peak_rss_mib, run_child, table  # noqa: E402


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipe, prompt = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    before = peak_rss_mib()
    if args.variant == "ours":
        record = pipe.unlearn("x", prompts=[prompt], steps=args.steps, seed=0, learning_rate=1e-4,
                              sampling_steps=args.sampling_steps, num_trajectories=1)
        timing = {"seconds": record.seconds, **record.timing}
        timing["seconds_per_step"] = record.seconds / args.steps
    else:
        from naive_esd import naive_esd

        timing = naive_esd(pipe, prompt, steps=args.steps, sampling_steps=args.sampling_steps)
    print(json.dumps({**timing, "peak_rss_mib": peak_rss_mib(), "extra_peak_mib": peak_rss_mib() - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minicanvas"], default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["ours", "naive"], default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    common = ["--model", args.model, "--steps", str(args.steps), "--sampling-steps", str(args.sampling_steps),
              "--threads", str(args.threads)]
    results = {v: run_child(Path(__file__), [*common, "--variant", v]) for v in ("ours", "naive")}
    rows = [[v, f"{r['seconds_per_step'] * 1000:.1f}", f"{r['seconds']:.2f}", f"{r['extra_peak_mib']:.1f}",
             f"{r['peak_rss_mib']:.0f}"] for v, r in results.items()]
    print(f"ESD, {args.model} pipeline, {args.steps} steps, {args.sampling_steps}-step DDIM trajectories, "
          f"{args.threads} thread(s)\n")
    print(table(rows, ["variant", "ms/step (incl. setup)", "total s", "extra peak MiB", "peak RSS MiB"]))
    ours, naive = results["ours"], results["naive"]
    print(f"\nspeed-up per step: {naive['seconds_per_step'] / ours['seconds_per_step']:.1f}x; "
          f"extra peak memory: {ours['extra_peak_mib']:.1f} MiB vs {naive['extra_peak_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
