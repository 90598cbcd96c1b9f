"""Time of one closed-form request at Stable Diffusion 1.5's K/V sizes, on the CPU.

    python scripts/closed_form_sd15.py [--earlier 11] [--repeats 3] [--threads 1]

Random SD 1.5-size weights: 16 cross-attention blocks, to_k and to_v of 768 -> 320/640/1280 (32 weights). Random
text keys at CLIP's sizes: 77 empty-prompt tokens plus ``--protected`` concept vectors; 4 prompts x 70 token pairs
for the new concept and as many for each of ``--earlier`` removals from the ledger (request 12 of a stream when
``--earlier 11``), with a trained earlier request's offsets on the weights (so the drift-correction path runs too).
Times the solve itself (``Solver.build`` once, then factors for every layer, compacted to float32), which is what
``unlearn(method="closed_form")`` does after encoding the prompts; the text encoder's forward passes are not
included (on SD 1.5 they are ~5 passes of ~70 prompts, and concept embeddings are cached on the pipeline).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_unlearn.objectives.closed_form import Solver, compact_factors

SD15_KV_OUT = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]  # 16 blocks
TEXT_WIDTH, TOKENS = 768, 77


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--earlier", type=int, default=11, help="earlier removals kept mapped (default 11)")
    parser.add_argument("--protected", type=int, default=69, help="protected concept vectors (default 69)")
    parser.add_argument("--pairs", type=int, default=280, help="token pairs per concept (default 4 x 70)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    base = {f"block{i}.attn2.{kv}": torch.randn(out, TEXT_WIDTH, generator=gen) * 0.02
            for i, out in enumerate(SD15_KV_OUT) for kv in ("to_k", "to_v")}
    offsets = {name: 1e-3 * torch.randn(w.shape, generator=gen) for name, w in base.items()}
    protected = torch.randn(TEXT_WIDTH, TOKENS + args.protected, generator=gen, dtype=torch.float64)
    mappings = [(torch.randn(args.pairs, TEXT_WIDTH, generator=gen, dtype=torch.float64),
                 torch.randn(args.pairs, TEXT_WIDTH, generator=gen, dtype=torch.float64))
                for _ in range(args.earlier + 1)]
    weights = [1.0] + [10.0] * args.earlier
    times, ranks = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        solver = Solver.build(protected, mappings, 1e-4, weights)
        applied = solver.to(torch.float32)
        ranks = []
        for name, w in base.items():
            a, b = compact_factors(*applied.layer_factors(w, offsets[name]))
            ranks.append(a.shape[0])
        times.append(time.perf_counter() - started)
    print(f"| K/V weights | text width | protected columns | earlier removals | pairs per concept | threads | "
          f"solve rank | LoRA ranks | seconds per request (best of {args.repeats}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(base)} (768 -> 320/640/1280) | {TEXT_WIDTH} | {protected.shape[1]} | {args.earlier} | {args.pairs} "
          f"| {args.threads} | {solver.directions.shape[1]} | {min(ranks)}-{max(ranks)} | {min(times):.3f} |")


if __name__ == "__main__":
    main()
