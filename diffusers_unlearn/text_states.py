"""Per-block text states of joint transformers: what each K/V layer reads for given prompts over sampled x_t.

In a UNet every cross-attention K/V layer reads the same text-encoder states. In SD3's and Flux's joint blocks
the text stream is normalised and modulated by the timestep (and pooled text) before each block's
``add_k_proj`` / ``add_v_proj``, and from the second block on it has also attended to the image: block i's input
depends on the prompt, t and x_t. Gradient projection on these models therefore protects, per layer, the states
collected here on the protected prompts over x_t drawn from the request's own trajectories; for the first block
they depend on (prompt, t) only, so its invariant is exact at every timestep of the sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from .conditioning import Conditioner


@dataclass
class ProtectedPrompt:
    """A prompt and the token positions whose states are protected (averaged into one vector)."""

    prompt: str
    positions: list[int]


@torch.no_grad()
def collect_block_states(
    conditioner: Conditioner,
    denoiser: torch.nn.Module,
    layers: Sequence[str],
    prompts: Sequence[ProtectedPrompt],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    samples_per_step: int = 1,
    frozen: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Per layer, a ``[d, m]`` matrix of the states it reads: one column per (prompt, x_t), the mean over the
    prompt's positions. ``latents`` [steps, trajectories, ...] and ``timesteps`` [steps] as a ``Conditioner``
    samples them; the first ``samples_per_step`` trajectories of every step are used (float32, CPU)."""
    if not prompts:
        return {}
    cond = conditioner.encode([p.prompt for p in prompts])
    batch = len(prompts)
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with frozen() if frozen is not None else nullcontext():
        for step in range(latents.shape[0]):
            for row in range(min(samples_per_step, latents.shape[1])):
                x_t = latents[step, row].unsqueeze(0).expand(batch, *latents.shape[2:])
                t = timesteps[step].reshape(1).expand(batch)
                seen = conditioner.kv_inputs(denoiser, x_t, t, cond, layers)
                for name in layers:
                    states = seen[name]
                    columns[name] += [states[i, p.positions].mean(dim=0).cpu() for i, p in enumerate(prompts)]
    return {name: torch.stack(vectors, dim=1) for name, vectors in columns.items()}


def relative_change(deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                    states: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the largest ||dW s|| / ||W s|| over the columns s of ``states[layer]``: how much the K/V
    outputs on those states move (0 = kept exactly)."""
    result = {}
    for name, columns in states.items():
        columns = columns.double()
        moved = (deltas[name].double().cpu() @ columns).norm(dim=0)
        base = (weights[name].detach().double().cpu() @ columns).norm(dim=0).clamp_min(1e-30)
        result[name] = float((moved / base).max())
    return result


__all__ = ["ProtectedPrompt", "collect_block_states", "relative_change"]
