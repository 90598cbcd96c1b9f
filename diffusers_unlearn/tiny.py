"""Tiny, real, offline pipelines: the "tiny" / "tiny-sdxl" models of ``load_pipeline`` and the command line,
and what tests, examples and CPU benchmarks run on (``du.testing`` re-exports them).

The components are the real diffusers/transformers classes (``UNet2DConditionModel`` with cross-attention,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTokenizer``, ``DDIMScheduler``) at toy sizes and random weights, so every
code path that runs on Stable Diffusion runs here, in well under a second and without a download.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ._tokenizer import build_clip_tokenizer
from .vocabulary import DEFAULT_VOCABULARY

__all__ = ["tiny_pipeline", "tiny_sdxl_pipeline", "TINY_WORDS", "SD1_DDIM_CONFIG"]

# Words the tiny tokenizer knows as single tokens: template words, the built-in concept vocabulary, test words.
TINY_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            *"a an the of in on at by with and style styled painting image picture photo portrait city house".split(),
            *"field street artwork drawing illustration art scene view landscape of".split(),
            *(w for concepts in DEFAULT_VOCABULARY.values() for c in concepts for w in c.split()),
        }
    )
)

# Prompts pad to 16 tokens, not 77: with random attention, 70 padding tokens would drown the concept's tokens and
# every prompt would condition the UNet alike.
TINY_MAX_LENGTH = 16

# Stable Diffusion 1.x's noise schedule, as its DDIMScheduler config (also MiniCanvas's).
SD1_DDIM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
    )


def _spread_token_embeddings(text_encoder: torch.nn.Module, std: float = 0.3) -> None:
    """At CLIP's init scale (0.02) every token's hidden state is nearly the same (concept cosine ~0.9); real CLIP
    concept embeddings range ~0.4-0.75, which a token-embedding std of 0.3 reproduces."""
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(mean=0.0, std=std)


def _tiny_unet(**architecture: Any) -> UNet2DConditionModel:
    """A 2-block UNet on 8x8x4 latents; ``architecture`` sets the block types and conditioning."""
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, **architecture)


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32) -> StableDiffusionPipeline:
    """A real ``StableDiffusionPipeline`` of tiny random components, identical for the same ``seed``.

    8x8x4 latents and 16x16 images; the UNet has 7 cross-attention blocks, so 14 ``attn2.to_k``/``attn2.to_v``
    layers. The global torch RNG is left as it was.
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
        )
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=cross_attention_dim))
        _spread_token_embeddings(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD1_DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A real ``StableDiffusionXLPipeline`` of tiny random components (two text encoders, text-time conditioning).

    The UNet's cross-attention input is the concatenation of both encoders' penultimate hidden states (16 + 16).
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    tokenizer_2 = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=16))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=16, projection_dim=16))
        _spread_token_embeddings(text_encoder)
        _spread_token_embeddings(text_encoder_2)
        unet = _tiny_unet(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text (16) + 6 time ids x 8
        )
        vae = _tiny_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SD1_DDIM_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
