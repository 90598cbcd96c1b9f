"""What the UNet sees of a prompt, for every supported pipeline family, and frozen-model sampling.

Stable Diffusion 1.x/2.x feed the text encoder's last hidden state to cross-attention; SDXL feeds the concatenated
penultimate hidden states of its two encoders plus pooled text and time ids. ``TextConditioner`` hides that
difference behind ``encode``/``predict_noise`` so objectives, projection and similarity work on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

SUPPORTED_ARCHITECTURES = (
    "Stable Diffusion 1.x/2.x and SDXL pipelines: a UNet2DConditionModel whose transformer blocks have "
    "cross-attention layers (attn2.to_k / attn2.to_v)"
)


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


class TextConditioner:
    """Encodes prompts exactly as the pipeline does and calls its UNet with them."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None and hasattr(pipe, "tokenizer_2")

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

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

    def predict_noise(
        self, unet: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        cond = cond.to(dtype)
        kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
        return unet(latents.to(dtype), timesteps, encoder_hidden_states=cond.hidden_states, **kwargs).sample

    @torch.no_grad()
    def token_hidden_states(self, prompts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """Cross-attention input per token [B, L, d] and the token ids of each prompt (first tokenizer)."""
        ids = self.pipe.tokenizer(
            prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length, truncation=True
        ).input_ids
        return self.encode(prompts).hidden_states.float(), ids


def sampling_scheduler(pipe: Any, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule, set to ``steps`` steps."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_trajectory(
    conditioner: TextConditioner,
    unet: torch.nn.Module,
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
    """Run DDIM with classifier-free guidance from noise; return every visited latent and its timestep.

    Returns ``(latents, timesteps)``: latents [steps, B, C, H, W] (the input at each step, in float32, on the
    UNet's device) and timesteps [steps]. One trajectory per row of ``cond``.
    """
    scheduler = sampling_scheduler(conditioner.pipe, steps)
    batch = len(cond)
    shape = conditioner.latent_shape(batch, resolution)
    latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    latents = latents.to(conditioner.device) * scheduler.init_noise_sigma
    both = Conditioning.cat([uncond, cond])
    visited = []
    for t in tqdm(scheduler.timesteps, desc=desc, unit="step", disable=not progress, leave=False):
        visited.append(latents)
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise_uncond, noise_cond = conditioner.predict_noise(unet, model_in, t, both).float().chunk(2)
        noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return torch.stack(visited), scheduler.timesteps.to(conditioner.device)
