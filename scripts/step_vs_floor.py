"""Time per training step against the hardware's floor, measured side by side in one process.

    python scripts/step_vs_floor.py [--model minicanvas|tiny] [--steps 100] [--rounds 3] [--threads 1]

The floor: a rank-4 peft LoRA on the cross-attention ``to_k`` / ``to_v`` of a copy of the same UNet, and per step one
forward pass at batch 1, one backward pass and one AdamW step, nothing else. The library: ``pipe.unlearn`` with
ESD's defaults (4 trajectories of 50 sampling steps, batch 1, rank 4), its loop time per step (setup excluded, as
the request's record reports it). The two alternate ``--rounds`` times in one process and thread count, so that
both see the same machine; the medians are compared. Also prints the request's setup (trajectories, frozen
targets, regularizers) as a share of the whole request.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import load, table  # noqa: E402


def floor_seconds_per_step(unet: torch.nn.Module, text_states: torch.Tensor, steps: int, rank: int = 4,
                           autocast_dtype: torch.dtype | None = None) -> float:
    """Seconds per step of the bare loop: LoRA forward + backward + AdamW at batch 1 on random points (the UNet's
    device; ``autocast_dtype``: autocast as the library's mixed precision does, adapter weights in float32)."""
    from peft import LoraConfig

    device = next(unet.parameters()).device
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["attn2.to_k", "attn2.to_v"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(steps, 1, unet.config.in_channels, size, size, generator=gen).to(device)
    targets = torch.randn(steps, 1, unet.config.in_channels, size, size, generator=gen).to(device)
    timesteps = torch.randint(0, 1000, (steps, 1), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for k in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            prediction = unet(latents[k], timesteps[k], encoder_hidden_states=text_states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), targets[k])
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minicanvas", "tiny"], default="minicanvas")
    parser.add_argument("--steps", type=int, default=100, help="training steps per request and per floor run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating library / floor runs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe, prompt = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    from diffusers_unlearn.engine.erasure_check import ErasureWarning

    warnings.simplefilter("ignore", ErasureWarning)  # the timed requests are not meant to erase anything
    floor_unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        text_states = pipe.encode_prompt(prompt, "cpu", 1, False)[0]

    from diffusers_unlearn.objectives.base import TrajectoryObjective

    batched_targets = TrajectoryObjective.precompute_targets

    def request(seed: int, precompute: bool) -> dict:
        # precompute=False: the former loop, which computed a trajectory step's frozen targets on its first visit
        TrajectoryObjective.precompute_targets = batched_targets if precompute else (lambda self, *a, **k: 0)
        try:
            record = pipe.unlearn("x", method="esd", prompts=[prompt], steps=args.steps, seed=seed, progress=False)
        finally:
            TrajectoryObjective.precompute_targets = batched_targets
        pipe.rollback(record.request_id)
        return dict(record.timing, seconds=record.seconds)

    library, on_demand, floor = [], [], []
    for round_ in range(args.rounds):
        library.append(request(round_, precompute=True))
        on_demand.append(request(round_, precompute=False))
        unet = copy.deepcopy(floor_unet)
        floor.append(floor_seconds_per_step(unet, text_states, args.steps))
        del unet
        print(f"round {round_ + 1}/{args.rounds}: library {library[-1]['seconds_per_step'] * 1000:.1f} ms/step, "
              f"targets on demand {on_demand[-1]['seconds_per_step'] * 1000:.1f}, floor {floor[-1] * 1000:.1f}",
              file=sys.stderr)

    def ms(values: list[float]) -> list[str]:
        return [f"{statistics.median(values) * 1000:.1f}", " ".join(f"{x * 1000:.1f}" for x in values)]

    lib = statistics.median(r["seconds_per_step"] for r in library)
    old = statistics.median(r["seconds_per_step"] for r in on_demand)
    flo = statistics.median(floor)
    print(f"ESD training step, {args.model} pipeline, batch 1, rank 4, {args.steps} steps, 4 trajectories x 50 "
          f"sampling steps, {args.threads} thread(s), {args.rounds} alternating rounds (torch {torch.__version__})\n")
    rows = [["library loop (setup excluded)", *ms([r["seconds_per_step"] for r in library])],
            ["library, frozen targets on demand (before)", *ms([r["seconds_per_step"] for r in on_demand])],
            ["floor: LoRA fwd + bwd + AdamW", *ms(floor)]]
    print(table(rows, ["variant", "median ms/step", "each round"]))
    print(f"\nstep / floor: {lib / flo:.2f}x (goal <= 1.15x); before (targets on demand): {old / flo:.2f}x")
    setup_share = [r["setup_seconds"] / r["seconds"] for r in library]
    setup_parts = library
    parts = setup_parts[len(setup_parts) // 2]
    print(f"setup share of a default request ({args.steps} steps): {statistics.median(setup_share):.1%} "
          f"(trajectories {parts['trajectory_seconds']:.2f} s, frozen targets {parts['target_seconds']:.2f} s, "
          f"regularizers {parts['regularizer_setup_seconds']:.2f} s)")
    print(f"whole request (setup + loop): {statistics.median(r['seconds'] for r in library):.2f} s; before (targets "
          f"on demand): {statistics.median(r['seconds'] for r in on_demand):.2f} s")


if __name__ == "__main__":
    main()
