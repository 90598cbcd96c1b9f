"""Per-block text states of joint transformers: what each K/V layer reads for given prompts over sampled x_t.

In a UNet every cross-attention K/V layer reads the same text-encoder states. In SD3's and Flux's joint blocks
the text stream is normalised and modulated by the timestep (and pooled text) before each block's
``add_k_proj`` / ``add_v_proj``, and from the second block on it has also attended to the image: block i's input
depends on the prompt, t and x_t. Gradient projection on these models therefore protects, per layer, the states
collected here on the protected prompts over x_t drawn from the request's own trajectories; for the first block
they depend on (prompt, t) only, so its invariant is exact at every timestep of the sampler.

``PromptStates`` reads what the K/V layers whose input no image enters (``ModelFamily.prompt_only_layers``) see of
whole prompts, token by token, without sampling anything: the text encoders' states for the UNets (one set for
every timestep), the first joint block's modulated text stream at each timestep of the sampler for SD3 and Flux.
The closed-form method solves on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import kv_module_names
from ..families.conditioning import Conditioner, TokenSegment
from ..families.registry import denoiser_of, family_of


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


@dataclass
class PromptStates:
    """Token states of whole prompts as the prompt-only K/V layers read them, at each of ``timesteps``.

    Every layer in ``family.prompt_only_layers`` reads the same states (``layer`` is the one read); ``timesteps``
    are the sampler's, at the steps (and image size) a request names. ``states`` is [T, B, L, d]: T = 1 where the
    states do not depend on the timestep (UNets), T = len(timesteps) otherwise (SD3, Flux).
    """

    conditioner: Conditioner
    layer: str
    timesteps: torch.Tensor
    per_timestep: bool = True  # False: the states are the same at every timestep (UNets)

    @classmethod
    def for_pipeline(cls, pipe: Any, layers: Iterable[str] | None = None, *, steps: int,
                     guidance_scale: float | None = None, resolution: int | None = None) -> PromptStates:
        """``layers``: the K/V layers a request adapts (default: every K/V layer of the pipeline's denoiser)."""
        family = family_of(pipe)
        names = kv_module_names(denoiser_of(pipe)) if layers is None else list(layers)
        chosen = family.prompt_only_layers(names)
        if not chosen:
            raise ValueError(f"none of the K/V layers {names} of this {family.name} pipeline reads the prompt alone "
                             f"(expected names starting with {family.prompt_only_prefix!r})")
        conditioner = family.conditioner(pipe, guidance_scale=guidance_scale)
        return cls(conditioner, chosen[0], conditioner.sampler_timesteps(steps, resolution).float().cpu(),
                   family.per_block_text_states)

    @property
    def key(self) -> tuple:
        """What the states depend on besides the prompt: for caching them."""
        settings = tuple(sorted((k, v) for k, v in vars(self.conditioner).items()
                                if isinstance(v, (bool, int, float, str))))
        # timesteps only where the states depend on them: a UNet request with other sampling steps reuses the cache
        timesteps = tuple(self.timesteps.tolist()) if self.per_timestep else ()
        return type(self.conditioner).__name__, self.layer, timesteps, settings

    @torch.no_grad()
    def states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[TokenSegment]]:
        """([T, B, L, d] float64 on the CPU, the token segments of the prompts)."""
        prompts = list(prompts)
        cond = self.conditioner.encode(prompts)
        hidden = self.conditioner.prompt_kv_inputs(cond, self.layer, self.timesteps.to(self.conditioner.device))
        return hidden.double().cpu(), self.conditioner.token_segments(prompts)

    @torch.no_grad()
    def unconditional(self) -> torch.Tensor:
        """[n, d] float64: the unconditional prompt's tokens the family keeps (``unconditional_positions``) at
        each timestep; all-zero tokens (SDXL's zeroed empty prompt) are left out."""
        cond = self.conditioner.encode_unconditional(1)
        hidden = self.conditioner.prompt_kv_inputs(cond, self.layer, self.timesteps.to(self.conditioner.device))
        rows = hidden[:, 0, self.conditioner.unconditional_positions()].double().cpu().flatten(0, 1)
        return rows[rows.norm(dim=1) > 0]


__all__ = ["PromptStates", "ProtectedPrompt", "collect_block_states", "relative_change"]
