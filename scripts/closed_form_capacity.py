"""Capacity of the closed form over a long stream: what request k costs, how far the K/V weights drift, and how much
of the K/V input the solve holds (protected rank, mapped rank) against the width, at SD 1.5's and SDXL's widths.

    python scripts/closed_form_capacity.py                      # SD 1.5 (768) and SDXL (2048), 36 requests each
    python scripts/closed_form_capacity.py --models sd15 --requests 36 --layer-stride 1

The inputs are those of ``closed_form_sd15.py`` (randomly initialised full-width CLIP text encoders, random K/V
weights, the library's default settings; the 70 kept concepts stay the same through the stream: the removed
concepts are not among them). Request k solves the k-th removal keeping the k - 1 before it mapped, from the
weights the stream left (each change is applied, so the drift is the stream's own), with the kept tokens' Gram
cached as ``solve`` caches it. Per request it prints:

* build s: ``Solver.build`` (what grows with k: the mapped keys' Gram), and layers s: ``layer_change`` for the
  layers solved (every ``--layer-stride``-th K/V layer; the per-layer cost does not depend on k);
* drift: ||W_k - W0||_F / ||W0||_F over those layers (``evaluation.kv_drift``'s measure);
* protected rank (span(P), held exactly), mapped rank (directions outside span(P) whose mapped-key energy is above
  the ridge, ``Solver.mapped_rank``), occupancy = (protected + mapped) / width, and whether ``check_capacity``
  warned (``CapacityWarning``);
* mapping gap of removal 1, of the newest removal and the worst over all removed so far: ||W_k c - W0 t|| /
  ||W0 c - W0 t|| over the removal's token pairs (c the key, t its target) on the first two layers solved: 0 when
  mapped exactly, 1 when untouched;
* kept change: ||(W_k - W0) x|| / ||W0 x|| over every 10th kept token, on the same two layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_form_sd15 import (CONCEPT_WEIGHT, EARLIER_WEIGHT, KEEP_WEIGHT, MODELS, RIDGE, RandomText,  # noqa: E402
                              World, kept_states, kv_weights, mapping_pairs)

from diffusers_unlearn.objectives.closed_form import CAPACITY_FRACTION, Solver, check_capacity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd15", "sdxl"])
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--kept", type=int, default=70)
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--layer-stride", type=int, nargs="+", default=None,
                        help="solve every n-th K/V layer, one per model (default: 1 for sd15, 10 for sdxl)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    strides = args.layer_stride or [1 if m == "sd15" else 10 for m in args.models]
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores), {args.threads} thread(s)")
    for model, stride in zip(args.models, strides):
        spec = MODELS[model]
        text = RandomText(model, args.encoder_layers)
        world = World.make(args.kept + args.requests)
        protected, keep = kept_states(text, world, world.concepts[:args.kept])
        started = time.perf_counter()
        keep_gram = keep.T @ keep
        gram_seconds = time.perf_counter() - started
        pairs = [mapping_pairs(text, world, c) for c in world.concepts[args.kept:]]
        every = kv_weights(spec["kv_out"], text.width)
        base = {n: w for i, (n, w) in enumerate(every.items()) if i % stride == 0}
        gap_layers = list(base)[:2]
        kept_rows = keep[::10].float()
        reference = {n: (kept_rows @ base[n].T).norm() for n in gap_layers}
        offsets: dict[str, torch.Tensor] = {}
        base_norm = sum(float(w.square().sum()) for w in base.values()) ** 0.5
        print(f"\n{spec['label']}: width {text.width}, {len(base)} of {len(every)} K/V layers solved, kept Gram "
              f"(once, cached after) {gram_seconds:.2f} s, {protected.shape[1]} protected columns, "
              f"{len(keep)} kept tokens, {len(pairs[0][0])} pairs for the first removal")
        print("| request | build s | layers s | drift | protected rank | mapped rank | occupancy | warned | "
              "gap removal 1 | gap newest | gap worst | kept change |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        first_full, untouched = None, []
        for k in range(1, args.requests + 1):
            mappings = [pairs[k - 1], *pairs[:k - 1]]
            weights = [CONCEPT_WEIGHT] + [EARLIER_WEIGHT] * (k - 1)
            started = time.perf_counter()
            solver = Solver.build(protected, mappings, RIDGE, weights, keep_weight=KEEP_WEIGHT, keep_gram=keep_gram)
            built = time.perf_counter() - started
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warned = check_capacity(solver, f"removal {k}")
            if warned and first_full is None:
                first_full = k
            applied = solver.to(torch.float32)
            started = time.perf_counter()
            for name, w in base.items():
                change = applied.layer_change(w, offsets.get(name))
                change = change[1] @ change[0] if isinstance(change, tuple) else change
                offsets[name] = change if name not in offsets else offsets[name] + change
            layers = time.perf_counter() - started
            drift = sum(float(e.square().sum()) for e in offsets.values()) ** 0.5 / base_norm
            if len(untouched) < k:  # W0 c - W0 t of the new removal, once
                keys, targets = pairs[k - 1]
                untouched.append({n: (keys - targets) @ base[n].double().T for n in gap_layers})
            gaps = []
            for (keys, _), residual in zip(pairs[:k], untouched):
                num = sum(float((residual[n] + keys @ offsets[n].double().T).square().sum()) for n in gap_layers)
                den = sum(float(residual[n].square().sum()) for n in gap_layers)
                gaps.append((num / den) ** 0.5)
            kept_change = max(float((kept_rows @ offsets[n].T).norm() / reference[n]) for n in gap_layers)
            print(f"| {k} | {built:.2f} | {layers:.2f} | {drift:.3f} | {solver.protected.shape[1]} | "
                  f"{solver.mapped_rank} | {solver.occupancy:.3f} | {'yes' if warned else 'no'} | {gaps[0]:.3f} | "
                  f"{gaps[-1]:.3f} | {max(gaps):.3f} | {kept_change:.4f} |", flush=True)
        print(f"\n{spec['label']}: the kept states and mapped removals reach {CAPACITY_FRACTION:.0%} of the "
              f"{text.width}-wide input at request {first_full if first_full else f'> {args.requests}'}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
