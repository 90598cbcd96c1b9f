"""``finetune``: benign fine-tuning resurgence (arXiv 2410.08074).

A user who downloads the unlearned model and fine-tunes it on something unrelated may bring the erased concept
back. The attack does that on a copy of the pipeline: the unlearning requests are folded into the copy's weights,
a peft LoRA is put on every attention projection of its denoiser (a UNet's ``to_q``, ``to_k``, ``to_v``,
``to_out.0``, self- and cross-attention; an SD3 or Flux transformer's image-stream projections and, in its joint
blocks, the text stream's ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``) and trained with the
ordinary denoising loss (flow matching for SD3 and Flux) on images of kept concepts only; then the erased concept's
plain prompts are scored on the copy. The pipeline given is never touched.

Training images: for a concept of the attack's world that renders its concepts (``EvalWorld.render``, e.g.
MiniCanvas), the world's own images of the kept concepts (real data, as a user would have); elsewhere, the
pipeline's own samples of the kept concepts' plain prompts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from tqdm.auto import tqdm

from ..._validation import check_count
from ...families.registry import ModelFamily, conditioner_for, denoiser_of, family_of
from ...mixins.attach import UnlearnMixin
from ...prompts import check_concept, same_concept
from ...vocabulary import DEFAULT_VOCABULARY
from .base import (
    Attack,
    AttackOutcome,
    NoisedBatches,
    TrainingAttackConfig,
    default_plain_templates,
    fill_templates,
    generate_latents,
)

ADAPTER_NAME = "resurgence_attack"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# The joint blocks of SD3 and Flux project the text stream with layers of its own.
TEXT_STREAM_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# Training images are drawn at seeds from here on, away from the scored images' seeds.
TRAINING_SEED_OFFSET = 20_000
# Kept concepts taken from the built-in vocabulary when none are given (for a concept outside the attack's world).
DEFAULT_KEPT = 8


@dataclass
class FinetuneAttackConfig(TrainingAttackConfig):
    """Settings of the ``finetune`` attack.

    Args:
        steps: fine-tuning steps.
        learning_rate: AdamW learning rate of the LoRA.
        rank: LoRA rank (alpha = rank).
        train_batch_size: images per step.
        kept: the concepts to fine-tune on (default: the world's concepts of the attacked concept's axis that are
            neither removed nor attacked; outside a world the first 8 such concepts of the built-in vocabulary of
            the domain).
        images_per_prompt: training images per kept concept and prompt.
        seeds: as in ``AttackConfig``.
        num_inference_steps: as in ``AttackConfig``.
        guidance_scale: as in ``AttackConfig``.
        batch_size: as in ``AttackConfig``.
        plain_templates: as in ``AttackConfig``.
        progress: as in ``AttackConfig``.
    """

    kind: ClassVar[str] = "finetune"
    steps: int = 300
    learning_rate: float = 1e-4
    rank: int = 4
    kept: Sequence[str] | None = None
    images_per_prompt: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "attack 'finetune'"
        check_count(self.rank, f"{owner} option rank")
        check_count(self.images_per_prompt, f"{owner} option images_per_prompt")
        if self.kept is not None:
            if isinstance(self.kept, str) or not isinstance(self.kept, Sequence) or not self.kept:
                raise ValueError(f"{owner} option kept must be a non-empty list of concepts, got {self.kept!r}")
            self.kept = [check_concept(c, "kept concept") for c in self.kept]


class FinetuneAttack(Attack):
    """Benign fine-tuning resurgence: a LoRA trained on kept concepts only, on a folded copy (module docstring).

    Args:
        config: the attack's settings.
        context: the pipeline, concept, classifier and world it attacks.
    """

    def check(self) -> None:
        """Refuse a kept list that contains the attacked concept, or an empty one.

        Raises:
            ValueError: the attacked concept is among the kept ones, or there is nothing to fine-tune on.
        """
        ctx = self.context
        kept = self.kept_concepts()
        clash = [c for c in kept if same_concept(c, ctx.concept)]
        if clash:
            raise ValueError(f"attack 'finetune' option kept must not contain the attacked concept {ctx.concept!r}")

    def kept_concepts(self) -> list[str]:
        """The concepts to fine-tune on: ``kept``, else those of the concept's axis neither removed nor attacked.

        Returns:
            The concepts.

        Raises:
            ValueError: none is left.
        """
        ctx = self.context
        if self.config.kept is not None:
            return list(self.config.kept)
        removed = list(getattr(ctx.pipe, "removed_concepts", []) or [])

        def keep(c: str) -> bool:
            return not any(same_concept(c, r) for r in [*removed, ctx.concept])

        if ctx.axis is not None:
            kept = [c for c in ctx.world.concepts(ctx.axis) if keep(c)]
        else:
            pool = DEFAULT_VOCABULARY.get(ctx.domain.rsplit("-", 1)[-1], ())
            kept = [c for c in pool if keep(c)][:DEFAULT_KEPT]
        if not kept:
            raise ValueError(f"attack 'finetune' found no kept concepts to fine-tune on for domain {ctx.domain!r} "
                             f"(removed: {removed}); pass kept=[...]")
        return kept

    def run(self) -> AttackOutcome:
        """Fine-tune a copy on the kept concepts' images and score the concept's plain prompts on it.

        Returns:
            The accuracy under attack, its optimisation steps, the number of images scored and per-kind details.
        """
        ctx, cfg = self.context, self.config
        kept = self.kept_concepts()
        work = copy.deepcopy(ctx.pipe)
        if isinstance(work, UnlearnMixin):
            work.fold()  # plain K/V layers: the LoRA below is the only adapter of the copy's UNet
        prompts, latents = self._training_data(work, kept)
        denoiser = denoiser_of(work)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=lora_targets(family_of(work)))
            inject_adapter_in_model(lora, denoiser, adapter_name=ADAPTER_NAME)
        denoiser.requires_grad_(False)
        params = [p for n, p in denoiser.named_parameters() if "lora_" in n and ADAPTER_NAME in n]
        for p in params:
            p.requires_grad_(True)
        conditioner = conditioner_for(work, guidance_scale=cfg.guidance_scale)
        unique = list(dict.fromkeys(prompts))
        cond = conditioner.encode(unique)
        prompt_rows = torch.tensor([unique.index(p) for p in prompts])
        batches = NoisedBatches(work, latents, ctx.generator(2))
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        device = denoiser.device
        losses = []
        denoiser.train()
        with tqdm(total=cfg.steps, desc="fine-tuning attack", unit="step", disable=not ctx.progress,
                  leave=False) as bar:
            for _ in range(cfg.steps):
                rows, noisy, timesteps, target = batches.sample(cfg.train_batch_size)
                prediction = conditioner.predict(denoiser, noisy.to(device), timesteps.to(device),
                                                 cond.select(prompt_rows[rows]))
                loss = F.mse_loss(prediction.float(), target.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
        denoiser.eval()
        images = ctx.images(work, ctx.plain_prompts(), "after fine-tuning")
        hits = ctx.hits(images)
        accuracy = 100.0 * sum(hits) / len(hits)
        del work
        window = max(1, len(losses) // 10)
        return AttackOutcome(
            accuracy=accuracy,
            steps=cfg.steps,
            num_images=len(ctx.plain_prompts()) * len(cfg.seeds),
            details={
                "kept": kept,
                "training_images": len(latents),
                "training_data": f"{ctx.world.name} renders" if ctx.axis is not None and ctx.world.render is not None
                else "pipeline samples",
                "lora_parameters": sum(p.numel() for p in params),
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
                # mean absolute pixel change of the plain prompts' images, fine-tuned copy against the pipeline
                "image_change": float((images - ctx.plain_images()).abs().mean()),
            },
        )

    def _training_data(self, work: Any, kept: list[str]) -> tuple[list[str], torch.Tensor]:
        """Prompts and clean latents of the kept concepts."""
        ctx, cfg = self.context, self.config
        seeds = [TRAINING_SEED_OFFSET + ctx.seed * cfg.images_per_prompt + i for i in range(cfg.images_per_prompt)]
        world, axis = ctx.world, ctx.axis
        if axis is not None and world.render is not None:
            other = world.objects if axis == "style" else world.styles
            pairs = [(k, o) if axis == "style" else (o, k) for k in kept for o in other]
            cases = [(s, o, seed) for s, o in pairs for seed in seeds]
            prompts = [world.prompt(s, o) for s, o, _ in cases]
            return prompts, encode_images(work, [world.render(s, o, seed, image_size(work)) for s, o, seed in cases])
        templates = default_plain_templates(kept[0], ctx.domain, world if axis is not None else None)
        base_prompts = [p for k in kept for group in fill_templates(templates, k, world, axis) for p in group]
        cases = [(p, s) for p in base_prompts for s in seeds]
        latents = generate_latents(work, [p for p, _ in cases], [s for _, s in cases],
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   batch_size=cfg.batch_size)
        return [p for p, _ in cases], latents



def lora_targets(family: ModelFamily) -> list[str]:
    """The attention projections the attack's LoRA adapts: every attention projection of a UNet, and for the joint
    transformers (SD3, Flux) the text stream's too."""
    if family.denoiser_attr == "unet":
        return list(ATTENTION_PROJECTIONS)
    return [*ATTENTION_PROJECTIONS, *TEXT_STREAM_PROJECTIONS]


def image_size(pipe: Any) -> int:
    """The pipeline's default image size in pixels (what ``generate_images`` draws without height/width)."""
    if family_of(pipe).denoiser_attr == "unet":
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(pipe: Any, images: list[Any]) -> torch.Tensor:
    """Clean latents of PIL images in the denoiser's input layout, as the pipeline's VAE maps them: the posterior's
    mean (deterministic: what the images are), shifted (SD3, Flux) and scaled by the VAE's config, and packed in
    2x2 patches for Flux."""
    vae = pipe.vae
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0 for im in images]))
    pixels = pixels.permute(0, 3, 1, 2).to(vae.device, next(vae.parameters()).dtype)
    out = []
    for start in range(0, len(pixels), 64):
        out.append(vae.encode(pixels[start : start + 64]).latent_dist.mean.float().cpu())
    family = family_of(pipe)
    if family.parametrisation != "flow":  # Stable Diffusion's pipelines scale only
        return torch.cat(out) * float(vae.config.scaling_factor)
    latents = (torch.cat(out) - float(vae.config.shift_factor or 0.0)) * float(vae.config.scaling_factor)
    if family.name == "flux":
        batch, channels, height, width = latents.shape
        latents = pipe._pack_latents(latents, batch, channels, height, width)
    return latents
