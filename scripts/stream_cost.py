"""Seconds per request over a stream of removal requests: sequential (this design) against simultaneous.

    python scripts/stream_cost.py [--model tiny|minicanvas] [--requests 12] [--steps 40]

Sequential: each request trains one adapter on the model with the earlier requests folded in (no more work for
request 12 than for request 1). Simultaneous: at request k, retrain from the base on all k concepts at once, with
k times the steps and trajectories (each concept gets the same training as in the sequential run), so its cost
grows with the stream. Both in one run; prints the per-request and cumulative seconds and their growth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import table  # noqa: E402

import diffusers_unlearn as du  # noqa: E402


def stream(model: str, n: int) -> tuple:
    """(make pipeline, [(concept, domain, prompts)]) for the chosen model."""
    if model == "minicanvas":
        from diffusers_unlearn import minicanvas

        concepts = [(s, "style", [minicanvas.prompt(s, o) for o in minicanvas.OBJECTS]) for s in minicanvas.STYLES]
        make = minicanvas.load_pipeline
    else:
        styles = du.vocabulary.DEFAULT_VOCABULARY["style"]
        concepts = [(s, "style", [t.format(s) for t in du.TEMPLATES["style"]]) for s in styles]
        make = lambda: du.testing.tiny_pipeline(seed=0)  # noqa: E731
    if n > len(concepts):
        raise SystemExit(f"--requests {n}: the {model} stream has {len(concepts)} concepts")
    return make, concepts[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minicanvas"], default="tiny")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40, help="training steps per concept")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make, concepts = stream(args.model, args.requests)
    common = dict(learning_rate=1e-3, sampling_steps=args.sampling_steps, progress=False)

    sequential = du.attach(make())
    seq_seconds = []
    for i, (concept, domain, prompts) in enumerate(concepts):
        record = sequential.unlearn(concept, domain=domain, prompts=prompts, steps=args.steps, seed=i,
                                    num_trajectories=len(prompts), **common)
        seq_seconds.append(record.seconds)

    sim_seconds = []
    for k in range(1, len(concepts) + 1):
        pipe = du.attach(make())  # retrain from the base on everything removed so far
        prompts = [p for _, _, ps in concepts[:k] for p in ps]
        record = pipe.unlearn("+".join(c for c, _, _ in concepts[:k]), prompts=prompts, steps=args.steps * k,
                              seed=0, num_trajectories=len(prompts), **common)
        sim_seconds.append(record.seconds)

    rows, seq_total, sim_total = [], 0.0, 0.0
    for k, (a, b) in enumerate(zip(seq_seconds, sim_seconds), start=1):
        seq_total, sim_total = seq_total + a, sim_total + b
        rows.append([k, f"{a:.2f}", f"{seq_total:.1f}", f"{b:.2f}", f"{sim_total:.1f}"])
    print(f"{args.model} pipeline, {args.requests} requests, {args.steps} steps per concept, "
          f"{args.threads} thread(s)\n")
    print(table(rows, ["request", "sequential s", "sequential cumulative s", "simultaneous s",
                       "simultaneous cumulative s"]))
    print(f"\nrequest {len(concepts)} / request 1: sequential {seq_seconds[-1] / seq_seconds[0]:.2f}x, "
          f"simultaneous {sim_seconds[-1] / sim_seconds[0]:.2f}x; cumulative after {len(concepts)}: "
          f"sequential {seq_total:.1f}s, simultaneous {sim_total:.1f}s ({sim_total / seq_total:.1f}x)")


if __name__ == "__main__":
    main()
