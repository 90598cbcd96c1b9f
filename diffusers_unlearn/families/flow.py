"""What the flow-matching transformers (SD3, Flux) see of a prompt, and sampling with their own pipeline.

Both predict the velocity v = noise - x0 of x_t = (1 - t) x0 + t noise (``FlowMatchEulerDiscreteScheduler``);
``predict`` returns it as the transformer does. Trajectories are sampled by the pipeline's own ``__call__`` (its
scheduler, timestep shift and guidance, exactly as a user's generation runs) with the latents recorded at every
step, so training sees the x_t the deployed sampler visits.

* SD3: CLIP-L and CLIP-G token states (concatenated, padded to T5's width) followed by T5 tokens, plus pooled
  CLIP text; classifier-free guidance against the empty prompt.
* Flux: T5 tokens plus pooled CLIP text. FLUX.1-dev is guidance-distilled: there is no unconditional pass, the
  guidance scale enters as an embedding (``guidance`` below, fed to every prediction, frozen or trained, so the
  target and the prediction are taken at the same distilled guidance). FLUX.1-schnell has no guidance embedding;
  then the scale is ignored, as its pipeline ignores it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from .._validation import check_int
from .conditioning import Conditioner, Conditioning, TokenSegment


def _pipeline_default(pipe: Any, name: str, fallback: Any) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class FlowConditioner(Conditioner):
    """Shared by SD3 and Flux: the text stream is the transformer's ``context_embedder`` input; sampling runs
    through the pipeline."""

    denoiser_attr = "transformer"
    pooled_text_key = "pooled_projections"

    def __init__(self, pipe: Any, guidance_scale: float | None = None):
        super().__init__(pipe)
        # What T5 prompts are padded to when a user generates: the pipeline's default (256 for SD3, 512 for Flux),
        # or ``pipe.unlearning_max_sequence_length`` for a deployment that passes another ``max_sequence_length``:
        # unlearning must see the text stream that generation will see.
        length = getattr(pipe, "unlearning_max_sequence_length", None)
        if length is None:
            length = _pipeline_default(pipe, "max_sequence_length", 256)
        self.max_sequence_length = check_int(length, "unlearning_max_sequence_length", minimum=1)
        self.guidance_scale = float(
            _pipeline_default(pipe, "guidance_scale", 3.5) if guidance_scale is None else guidance_scale
        )

    @property
    def cross_attention_dim(self) -> int:
        return int(self.denoiser.context_embedder.out_features)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    @torch.no_grad()
    def text_states(self, prompts: list[str]) -> torch.Tensor:
        """The text stream entering the first joint block: ``context_embedder`` of the encoders' token states."""
        hidden = self.encode(prompts).hidden_states
        embedder = self.denoiser.context_embedder
        return embedder(hidden.to(embedder.weight.dtype)).float()

    @torch.no_grad()
    def encode_unconditional(self, batch: int) -> Conditioning:
        return Conditioning.cat([self.encode([""])] * batch)

    def unconditional_positions(self) -> list[int]:
        """The empty prompt's start and end tokens in every tokenizer segment. Its padding positions are left out:
        there are hundreds of them (up to 512), and keeping them all would use up the text space."""
        chosen = []
        for segment in self.token_segments([""]):
            tokenizer, ids = segment.tokenizer, segment.ids[0]
            pad = tokenizer.pad_token_id
            content = [i for i, token in enumerate(ids) if token != pad or i == 0]
            # CLIP pads with its end token: keep the first end token too
            end = next((i for i, token in enumerate(ids) if token == tokenizer.eos_token_id), None)
            for i in content + ([end] if end is not None else []):
                if segment.offset + i not in chosen:
                    chosen.append(segment.offset + i)
        return sorted(chosen)

    def _ids(self, tokenizer: Any, prompts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        dtype = next(denoiser.parameters()).dtype
        cond = cond.to(dtype)
        timesteps = timesteps.to(latents.device).expand(latents.shape[0])
        return denoiser(
            hidden_states=latents.to(dtype), encoder_hidden_states=cond.hidden_states,
            pooled_projections=cond.added["pooled_projections"], return_dict=False,
            **self._denoiser_arguments(latents, timesteps, cond, dtype),
        )[0]

    def _denoiser_arguments(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, dtype: torch.dtype
    ) -> dict[str, Any]:
        """The family's own keywords of the transformer call: its timestep convention, position ids, guidance
        (``timesteps`` are already on the latents' device, one per row; ``cond`` is in the transformer's dtype)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- sampling
    def _call_arguments(self, cond: Conditioning, uncond: Conditioning, guidance_scale: float) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def sample_trajectory(
        self, denoiser: torch.nn.Module, cond: Conditioning, uncond: Conditioning, *, steps: int,
        guidance_scale: float, generator: torch.Generator, resolution: int | None = None, progress: bool = False,
        desc: str = "sampling trajectories",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if denoiser is not self.denoiser:
            raise ValueError("flow-matching trajectories are sampled by the pipeline: pass its own transformer")
        pipe = self.pipe
        size = self.default_resolution() if resolution is None else int(resolution)
        latents = self.initial_latents(len(cond), size, generator)
        visited = [latents.float()]

        def record(_pipe: Any, _step: int, _t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict:
            visited.append(tensors["latents"].float())
            return {}

        bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(**{**bar, "desc": desc, "leave": False, "disable": not progress})
        try:
            pipe(
                **self._call_arguments(cond, uncond, guidance_scale),
                height=size,
                width=size,
                num_inference_steps=steps,
                latents=latents,
                output_type="latent",
                callback_on_step_end=record,
                callback_on_step_end_tensor_inputs=["latents"],
            )
        finally:
            pipe._progress_bar_config = bar
        timesteps = pipe.scheduler.timesteps.to(self.device).float()
        return torch.stack(visited[: len(timesteps)]), timesteps

    def initial_latents(self, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
        """Noise in the transformer's input layout, drawn as the pipeline draws it."""
        raise NotImplementedError

    def smallest_resolution(self) -> int:
        """The image size in pixels of a one-token image (a latent patch)."""
        raise NotImplementedError

    @torch.no_grad()
    def sampler_timesteps(self, steps: int, resolution: int | None = None) -> torch.Tensor:
        """The pipeline's own schedule (its shift, and Flux's image-size-dependent shift): one sampler step is run
        on the empty prompt and the call is then interrupted, so only the pipeline decides the timesteps."""
        pipe = self.pipe
        size = self.default_resolution() if resolution is None else int(resolution)
        uncond = self.encode_unconditional(1)

        def interrupt(_pipe: Any, _step: int, _t: torch.Tensor, _tensors: dict[str, torch.Tensor]) -> dict:
            _pipe._interrupt = True  # diffusers' documented way to end a call early: the remaining steps are skipped
            return {}

        bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(**{**bar, "disable": True})
        try:
            pipe(**self._call_arguments(uncond, uncond, self.guidance_scale), height=size, width=size,
                 num_inference_steps=steps, latents=self.initial_latents(1, size, torch.Generator().manual_seed(0)),
                 output_type="latent", callback_on_step_end=interrupt)
        finally:
            pipe._progress_bar_config = bar
            pipe._interrupt = False
        return pipe.scheduler.timesteps.to(self.device).float()

    @torch.no_grad()
    def prompt_kv_inputs(self, cond: Conditioning, layer: str, timesteps: torch.Tensor) -> torch.Tensor:
        """The first joint block's text-stream input, ``norm1_context`` of the ``context_embedder`` output, modulated
        by the timestep and the pooled text (and Flux's guidance embedding): no image enters it. It is read by a
        hook on ``layer`` in a transformer call on a one-token image, which the hook ends there."""
        denoiser = self.denoiser
        module = denoiser.get_submodule(layer)
        latents = self.initial_latents(len(cond), self.smallest_resolution(), torch.Generator().manual_seed(0))
        seen: list[torch.Tensor] = []

        def capture(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            seen.append((args[0] if args else kwargs["input"]).detach().float())
            raise _Captured

        hook = module.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for t in timesteps.reshape(-1):
                try:
                    self.predict(denoiser, latents, t.reshape(1), cond)
                except _Captured:
                    continue
                raise ValueError(f"the transformer's forward pass never called {layer!r}")
        finally:
            hook.remove()
        return torch.stack(seen)


class _Captured(Exception):
    """Raised by ``prompt_kv_inputs``' hook once it has what it reads: the rest of the pass is not needed."""


class SD3Conditioner(FlowConditioner):
    """``StableDiffusion3Pipeline``: joint blocks whose text stream starts as CLIP-L/G + T5 token states."""

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds, {"pooled_projections": pooled})

    def _denoiser_arguments(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, dtype: torch.dtype
    ) -> dict[str, Any]:
        return {"timestep": timesteps}

    def token_segments(self, prompts: list[str]) -> list[TokenSegment]:
        clip_length = int(self.pipe.tokenizer_max_length)
        segments = [TokenSegment(0, self.pipe.tokenizer, self._ids(self.pipe.tokenizer, prompts, clip_length))]
        if getattr(self.pipe, "text_encoder_3", None) is not None:
            tokenizer = self.pipe.tokenizer_3
            segments.append(TokenSegment(clip_length, tokenizer, self._ids(tokenizer, prompts,
                                                                            self.max_sequence_length)))
        return segments

    def _call_arguments(self, cond: Conditioning, uncond: Conditioning, guidance_scale: float) -> dict[str, Any]:
        return dict(
            prompt_embeds=cond.hidden_states, pooled_prompt_embeds=cond.added["pooled_projections"],
            negative_prompt_embeds=uncond.hidden_states,
            negative_pooled_prompt_embeds=uncond.added["pooled_projections"],
            guidance_scale=guidance_scale,
        )

    def initial_latents(self, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
        channels = int(self.denoiser.config.in_channels)
        return self.pipe.prepare_latents(batch, channels, size, size, torch.float32, self.device, generator)

    def smallest_resolution(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)


class FluxConditioner(FlowConditioner):
    """``FluxPipeline``: T5 token states and pooled CLIP text; a guidance embedding instead of CFG (FLUX.1-dev)."""

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds, {"pooled_projections": pooled})

    def _denoiser_arguments(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, dtype: torch.dtype
    ) -> dict[str, Any]:
        batch, tokens, device = latents.shape[0], latents.shape[1], latents.device
        height, width = self._grid(tokens)
        image_ids = self.pipe._prepare_latent_image_ids(batch, height, width, device, dtype)
        text_ids = torch.zeros(cond.hidden_states.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
        # Flux's transformer takes the timestep in [0, 1] (the pipeline divides by 1000 too)
        return dict(timestep=timesteps.to(dtype) / 1000, guidance=guidance, txt_ids=text_ids, img_ids=image_ids)

    def _grid(self, tokens: int) -> tuple[int, int]:
        # packed 2x2 latent patches; trajectories are square (height == width)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"Flux latents of {tokens} tokens are not a square grid; sample square images")
        return side, side

    def token_segments(self, prompts: list[str]) -> list[TokenSegment]:
        tokenizer = self.pipe.tokenizer_2
        return [TokenSegment(0, tokenizer, self._ids(tokenizer, prompts, self.max_sequence_length))]

    def _call_arguments(self, cond: Conditioning, uncond: Conditioning, guidance_scale: float) -> dict[str, Any]:
        # guidance-distilled: no negative prompt, no true CFG; the scale is the distilled guidance embedding
        self.guidance_scale = float(guidance_scale)
        return dict(prompt_embeds=cond.hidden_states, pooled_prompt_embeds=cond.added["pooled_projections"],
                    guidance_scale=guidance_scale)

    def initial_latents(self, batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
        channels = int(self.denoiser.config.in_channels) // 4
        latents, _ = self.pipe.prepare_latents(batch, channels, size, size, torch.float32, self.device, generator)
        return latents

    def smallest_resolution(self) -> int:
        return self.vae_scale_factor * 2  # latents are packed in 2x2 patches
