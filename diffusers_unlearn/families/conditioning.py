"""What the denoiser sees of a prompt, and frozen-model sampling: the ``Conditioner`` interface and its UNet form.

A conditioner encodes prompts exactly as its pipeline does, calls the denoiser with them (``predict``: the model's
output in its own parametrisation, noise or velocity), samples trajectories with the pipeline's scheduler and says
where a concept's tokens sit in the text sequence. Objectives, gradient projection and similarity only talk to
this interface, so they work on every model family (``families/registry.py``).

Here: ``TextConditioner`` for UNets. Stable Diffusion 1.x/2.x feed the text encoder's last hidden state to
cross-attention; SDXL feeds the concatenated penultimate hidden states of its two encoders plus pooled text and
time ids. The flow-matching transformers (SD3, Flux) are in ``families/flow.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


@dataclass
class Conditioning:
    """Cross-attention input ``hidden_states`` [B, L, d] and, for SDXL, ``added`` (text_embeds, time_ids)."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def select(self, index: torch.Tensor | list[int] | slice) -> Conditioning:
        added = None if self.added is None else {k: v[index] for k, v in self.added.items()}
        return Conditioning(self.hidden_states[index], added)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.hidden_states for p in parts]), added)

    def to(self, dtype: torch.dtype) -> Conditioning:
        added = None if self.added is None else {k: v.to(dtype) for k, v in self.added.items()}
        return Conditioning(self.hidden_states.to(dtype), added)


@dataclass
class TokenSegment:
    """A run of the denoiser's text sequence that one tokenizer produced: positions ``offset`` to
    ``offset + length - 1`` hold ``tokenizer``'s ids for each prompt (SD3: CLIP then T5 tokens)."""

    offset: int
    tokenizer: Any
    ids: list[list[int]]


class Conditioner:
    """The interface every model family implements (see the module docstring)."""

    denoiser_attr = "unet"
    # The ``Conditioning.added`` entry holding the pooled text vector, a route around the K/V layers (SDXL's
    # ``add_embedding``, SD3's and Flux's ``time_text_embed``); None where the prompt reaches the model only as tokens.
    pooled_text_key: str | None = None

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def cross_attention_dim(self) -> int:
        """Width of the text states the K/V layers read."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_unconditional(self, batch: int) -> Conditioning:
        raise NotImplementedError

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The denoiser's output for ``latents`` at ``timesteps`` (the scheduler's values), in its own
        parametrisation: noise (or v) for the UNets, the flow-matching velocity noise - x0 for SD3 and Flux."""
        raise NotImplementedError

    def predict_noise(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Former name of :meth:`predict` (the output is the model's own parametrisation, not always noise)."""
        return self.predict(*args, **kwargs)

    def sample_trajectory(
        self, denoiser: torch.nn.Module, cond: Conditioning, uncond: Conditioning, *, steps: int,
        guidance_scale: float, generator: torch.Generator, resolution: int | None = None, progress: bool = False,
        desc: str = "sampling trajectories",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample from noise with the pipeline's scheduler; return every visited latent [steps, B, ...] (the
        denoiser's input at each step, float32) and the timesteps [steps]."""
        raise NotImplementedError

    def token_segments(self, prompts: list[str]) -> list[TokenSegment]:
        raise NotImplementedError

    def text_states(self, prompts: list[str]) -> torch.Tensor:
        """Per-token text states [B, L, d] in the space the K/V layers read (before any per-block change)."""
        raise NotImplementedError

    def unconditional_positions(self) -> list[int]:
        """Positions of the empty prompt whose K/V inputs gradient projection keeps (all, for the UNets)."""
        return list(range(self.encode([""]).hidden_states.shape[1]))

    def sampler_timesteps(self, steps: int, resolution: int | None = None) -> torch.Tensor:
        """The timesteps [steps] the pipeline's sampler visits in ``steps`` steps (at ``resolution`` pixels, default
        the native size: Flux shifts its schedule by the image size)."""
        raise NotImplementedError

    def prompt_kv_inputs(self, cond: Conditioning, layer: str, timesteps: torch.Tensor) -> torch.Tensor:
        """What K/V layer ``layer`` reads for each row of ``cond`` at each of ``timesteps``: [T, B, L, d], float32.

        Only for layers whose input does not depend on the image (``ModelFamily.prompt_only_layers``): then these
        are the exact states the layer reads during any generation at those timesteps. T = 1 where the input does
        not depend on the timestep either (the UNets: the text encoders' states themselves).
        """
        raise NotImplementedError

    def concept_positions(self, prompts: Sequence[str], concept: str) -> list[list[int]]:
        """Positions of ``concept``'s tokens in each prompt's text sequence, over every tokenizer segment.

        Where a template changes how the concept tokenizes, that prompt's content tokens are used, with a warning.
        """
        positions: list[list[int]] = [[] for _ in prompts]
        fallback: list[list[int]] = [[] for _ in prompts]
        for segment in self.token_segments(list(prompts)):
            tokenizer = segment.tokenizer
            concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
            special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
            for row, ids in enumerate(segment.ids):
                start = _find_sublist(ids, concept_ids)
                if start >= 0:
                    positions[row] += [segment.offset + i for i in range(start, start + len(concept_ids))]
                fallback[row] += [segment.offset + i for i, token in enumerate(ids) if token not in special]
        for row, prompt in enumerate(prompts):
            if not positions[row]:
                warnings.warn(
                    f"concept {concept!r} does not tokenize the same inside {prompt!r}; its embedding there averages "
                    "every token of the prompt",
                    stacklevel=3,
                )
                positions[row] = fallback[row]
        return positions

    @torch.no_grad()
    def kv_inputs(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
        layers: Sequence[str],
    ) -> dict[str, torch.Tensor]:
        """What each K/V layer in ``layers`` reads [B, L, d] (float32) in one denoiser pass: the text stream as it
        reaches that block (for joint transformer blocks it depends on the block, the timestep and the image)."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            denoiser.get_submodule(name).register_forward_pre_hook(
                lambda module, args, kwargs, name=name: seen.__setitem__(name, (args[0] if args else kwargs["input"])
                                                                          .detach().float()),
                with_kwargs=True,
            )
            for name in layers
        ]
        try:
            self.predict(denoiser, latents, timesteps, cond)
        finally:
            for hook in hooks:
                hook.remove()
        return seen


def _find_sublist(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if needle and haystack[start : start + len(needle)] == needle:
            return start
    return -1


class TextConditioner(Conditioner):
    """Encodes prompts exactly as the pipeline does and calls its UNet with them (SD 1.x/2.x, SDXL)."""

    denoiser_attr = "unet"

    def __init__(self, pipe: Any, guidance_scale: float | None = None):
        super().__init__(pipe)
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None and hasattr(pipe, "tokenizer_2")
        self.pooled_text_key = "text_embeds" if self.is_sdxl else None

    @property
    def cross_attention_dim(self) -> int:
        return int(self.pipe.unet.config.cross_attention_dim)

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, int, int, int]:
        """Latent shape for ``batch`` images at ``resolution`` pixels (default: the UNet's native size)."""
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        size = self.pipe.unet.config.sample_size if resolution is None else resolution // vae_scale
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch, int(self.pipe.unet.config.in_channels), int(height), int(width))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning the pipeline builds for ``prompts`` (no classifier-free guidance pairing)."""
        if not self.is_sdxl:
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return Conditioning(embeds)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": self._time_ids(len(prompts), pooled.dtype)})

    @torch.no_grad()
    def encode_unconditional(self, batch: int) -> Conditioning:
        """The unconditional branch the pipeline uses for classifier-free guidance (SDXL may force zeros)."""
        if self.is_sdxl and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond = self.encode([""])
            zeros = Conditioning(
                torch.zeros_like(cond.hidden_states),
                {"text_embeds": torch.zeros_like(cond.added["text_embeds"]), "time_ids": cond.added["time_ids"]},
            )
            return Conditioning.cat([zeros] * batch)
        return Conditioning.cat([self.encode([""])] * batch)

    def _time_ids(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        _, _, height, width = self.latent_shape(1)
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        size = [height * vae_scale, width * vae_scale]
        ids = torch.tensor([size + [0, 0] + size], dtype=dtype, device=self.device)
        return ids.repeat(batch, 1)

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = next(denoiser.parameters()).dtype
        cond = cond.to(dtype)
        kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
        return denoiser(latents.to(dtype), timesteps, encoder_hidden_states=cond.hidden_states, **kwargs).sample

    @torch.no_grad()
    def token_hidden_states(self, prompts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """Cross-attention input per token [B, L, d] and the token ids of each prompt (first tokenizer)."""
        return self.encode(prompts).hidden_states.float(), self._token_ids(prompts)

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        tokenizer = self.pipe.tokenizer
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids

    def token_segments(self, prompts: list[str]) -> list[TokenSegment]:
        # SDXL's two tokenizers give the same positions (their states are concatenated feature-wise): one segment
        return [TokenSegment(0, self.pipe.tokenizer, self._token_ids(prompts))]

    def text_states(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts).hidden_states.float()

    def sampler_timesteps(self, steps: int, resolution: int | None = None) -> torch.Tensor:
        return sampling_scheduler(self.pipe, steps).timesteps.to(self.device)

    def prompt_kv_inputs(self, cond: Conditioning, layer: str, timesteps: torch.Tensor) -> torch.Tensor:
        # cross-attention K/V read the encoder states as they are, at every timestep and in every block
        return cond.hidden_states.float()[None]

    @torch.no_grad()
    def sample_trajectory(
        self, denoiser: torch.nn.Module, cond: Conditioning, uncond: Conditioning, *, steps: int,
        guidance_scale: float, generator: torch.Generator, resolution: int | None = None, progress: bool = False,
        desc: str = "sampling trajectories",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run DDIM with classifier-free guidance from noise; return every visited latent and its timestep.

        Returns ``(latents, timesteps)``: latents [steps, B, C, H, W] (the input at each step, in float32, on the
        UNet's device) and timesteps [steps]. One trajectory per row of ``cond``.
        """
        scheduler = sampling_scheduler(self.pipe, steps)
        batch = len(cond)
        shape = self.latent_shape(batch, resolution)
        latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        latents = latents.to(self.device) * scheduler.init_noise_sigma
        both = Conditioning.cat([uncond, cond])
        visited = []
        for t in tqdm(scheduler.timesteps, desc=desc, unit="step", disable=not progress, leave=False):
            visited.append(latents)
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            noise_uncond, noise_cond = self.predict(denoiser, model_in, t, both).float().chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        return torch.stack(visited), scheduler.timesteps.to(self.device)


def sampling_scheduler(pipe: Any, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule, set to ``steps`` steps."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def sample_trajectory(
    conditioner: Conditioner,
    denoiser: torch.nn.Module,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    resolution: int | None = None,
    progress: bool = False,
    desc: str = "sampling trajectories",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's trajectories with the conditioner's own sampler (see ``Conditioner.sample_trajectory``)."""
    return conditioner.sample_trajectory(denoiser, cond, uncond, steps=steps, guidance_scale=guidance_scale,
                                         generator=generator, resolution=resolution, progress=progress, desc=desc)

