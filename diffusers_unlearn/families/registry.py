"""Model families: what differs between the pipelines this package unlearns on, in one description each.

A family says which pipeline attribute holds the denoiser, which of its linear layers read the text (the K/V
layers every request adapts), how prompts condition it and in which parametrisation it predicts (its
``Conditioner``), and which diffusers LoRA loader writes its LoRAs. Everything else (objectives, regularizers,
composition, ledger, export) is written once against these descriptions. A new family is one ``ModelFamily``
and one ``register_family`` line.

Why these layers:

* UNets (SD 1.x/2.x, SDXL): cross-attention ``attn2.to_k`` / ``attn2.to_v`` read only the text.
* SD3 and Flux joint (dual-stream) blocks: the text stream has its own projections ``attn.add_k_proj`` /
  ``attn.add_v_proj`` next to the image stream's ``to_k`` / ``to_v``; only the former read text tokens alone.
* Flux's single-stream blocks are left alone: one ``to_k`` / ``to_v`` projects the concatenation of image and
  text tokens, so any change there moves every image token as well, whatever the prompt; it cannot be an edit
  of how one concept's text is read, and gradient projection could not keep it off the protected prompts (the
  protected set would have to cover the image tokens too). The text tokens those blocks see come out of the
  last joint block, whose adapted K/V already change them.

Which layers read the prompt alone (``prompt_only_layers``): a UNet's cross-attention K/V read the text encoders'
states at every block and timestep. A joint transformer's first block reads the context embedder's output,
normalised and modulated by the timestep and the pooled text (no image); every later block reads a text stream that
has attended to the image (and to the earlier blocks' K/V). Methods that need K/V inputs fixed by the prompt
(``method="closed_form"``) edit only the former.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .conditioning import Conditioner, TextConditioner
from .flow import FluxConditioner, SD3Conditioner


@dataclass(frozen=True)
class ModelFamily:
    """One kind of denoiser and its pipelines.

    Args:
        name: short name ("unet", "sd3", "flux").
        denoiser_classes: class names of the denoiser (a subclass also matches).
        denoiser_attr: the pipeline attribute holding it ("unet" or "transformer").
        kv_suffixes: module-name endings of the K/V layers that read the text.
        parametrisation: what the denoiser predicts ("epsilon" or the scheduler's type for UNets, "flow" velocity).
        conditioner: builds the family's ``Conditioner`` for a pipeline (and a guidance scale).
        lora_loader: name of the diffusers LoRA loader mixin whose ``save_lora_weights`` writes its LoRAs.
        lora_component: the keyword prefix of that loader ("unet" -> ``unet_lora_layers``).
        description: for error messages and docs.
        prompt_only_prefix: module-name prefix of the K/V layers whose input depends on the prompt (and the
            timestep) but not on the image ("": every K/V layer).
    """

    name: str
    denoiser_classes: tuple[str, ...]
    denoiser_attr: str
    kv_suffixes: tuple[str, ...]
    parametrisation: str
    conditioner: Callable[..., Conditioner]
    lora_loader: str
    lora_component: str
    description: str
    prompt_only_prefix: str = ""

    def matches(self, denoiser: object) -> bool:
        names = {cls.__name__ for cls in type(denoiser).__mro__}
        return any(name in names for name in self.denoiser_classes)

    @property
    def per_block_text_states(self) -> bool:
        """True when each block's K/V read a different text state (joint blocks update the text stream)."""
        return self.denoiser_attr == "transformer"

    def prompt_only_layers(self, layers: Iterable[str]) -> list[str]:
        """The layers of ``layers`` (K/V module names) whose input no image enters: all of a UNet's, the first joint
        block's of SD3 and Flux."""
        return [layer for layer in layers if layer.startswith(self.prompt_only_prefix)]


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family known to ``family_of`` (a name may be registered once)."""
    if family.name in FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


register_family(ModelFamily(
    name="unet", denoiser_classes=("UNet2DConditionModel",), denoiser_attr="unet",
    kv_suffixes=("attn2.to_k", "attn2.to_v"), parametrisation="epsilon", conditioner=TextConditioner,
    lora_loader="StableDiffusionLoraLoaderMixin", lora_component="unet",
    description="Stable Diffusion 1.x/2.x and SDXL (UNet2DConditionModel cross-attention attn2.to_k / attn2.to_v)",
))

# What the joint-block transformers (SD3, Flux) have in common: a velocity-predicting ``pipe.transformer`` whose
# text stream has its own K/V projections, saved under the ``transformer`` prefix of their LoRA loaders.
JOINT_TRANSFORMER = dict(
    denoiser_attr="transformer", kv_suffixes=("attn.add_k_proj", "attn.add_v_proj"), parametrisation="flow",
    lora_component="transformer", prompt_only_prefix="transformer_blocks.0.",
)
register_family(ModelFamily(
    name="sd3", denoiser_classes=("SD3Transformer2DModel",), conditioner=SD3Conditioner,
    lora_loader="SD3LoraLoaderMixin", **JOINT_TRANSFORMER,
    description="Stable Diffusion 3 / 3.5 (SD3Transformer2DModel joint blocks, text-stream add_k_proj / add_v_proj)",
))
register_family(ModelFamily(
    name="flux", denoiser_classes=("FluxTransformer2DModel",), conditioner=FluxConditioner,
    lora_loader="FluxLoraLoaderMixin", **JOINT_TRANSFORMER,
    description="Flux (FluxTransformer2DModel dual-stream blocks, text-stream add_k_proj / add_v_proj)",
))


def supported_architectures() -> str:
    return "; ".join(f.description for f in FAMILIES.values())


def family_of_denoiser(denoiser: object) -> ModelFamily | None:
    for family in FAMILIES.values():
        if family.matches(denoiser):
            return family
    return None


def denoiser_of(pipe: Any) -> torch.nn.Module | None:
    """The pipeline's denoiser of a known family (its UNet or transformer), or None."""
    for family in FAMILIES.values():
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is not None and family.matches(denoiser):
            return denoiser
    return None


# The (tokenizer, text encoder) attribute pairs a diffusers pipeline may have: SD's one, SDXL's two, SD3's three.
TEXT_ENCODERS: tuple[tuple[str, str], ...] = (
    ("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"),
)


def text_encoder_pairs(pipe: Any) -> list[tuple[str, str]]:
    """The (tokenizer, text encoder) attribute names of ``TEXT_ENCODERS`` that the pipeline holds, in that order."""
    return [(t, e) for t, e in TEXT_ENCODERS
            if getattr(pipe, t, None) is not None and getattr(pipe, e, None) is not None]


def family_of(pipe: Any) -> ModelFamily:
    """The family of a pipeline, or a ``TypeError`` naming what is supported."""
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        found = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or pipe
        raise TypeError(
            f"{type(pipe).__name__} (denoiser {type(found).__name__}) has no text K/V layers this package knows how "
            f"to unlearn on; supported: {supported_architectures()}"
        )
    return family_of_denoiser(denoiser)  # type: ignore[return-value]


def conditioner_for(pipe: Any, guidance_scale: float | None = None) -> Conditioner:
    """The pipeline's conditioner; ``guidance_scale`` is the distilled guidance for Flux (ignored elsewhere)."""
    return family_of(pipe).conditioner(pipe, guidance_scale=guidance_scale)


__all__ = [
    "FAMILIES",
    "TEXT_ENCODERS",
    "ModelFamily",
    "conditioner_for",
    "denoiser_of",
    "family_of",
    "family_of_denoiser",
    "text_encoder_pairs",
    "register_family",
    "supported_architectures",
]
