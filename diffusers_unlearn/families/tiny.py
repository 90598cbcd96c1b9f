"""Tiny, real, offline pipelines: the "tiny" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" models of ``load_pipeline``
and the command line, and what tests, examples and CPU benchmarks run on (``du.testing`` re-exports them).

The components are the real diffusers/transformers classes (``UNet2DConditionModel`` with cross-attention,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``AutoencoderKL``, CLIP and T5 text encoders and their
tokenizers, DDIM and flow-matching schedulers) at toy sizes and random weights, so every code path that runs on
Stable Diffusion, SDXL, SD3 and Flux runs here, in well under a second and without a download.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from .._tokenizer import build_clip_tokenizer, build_t5_tokenizer
from ..vocabulary import DEFAULT_VOCABULARY

__all__ = ["tiny_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline", "TINY_WORDS",
           "SD1_DDIM_CONFIG"]

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


def _token_ids(tokenizer: Any) -> dict[str, int]:
    """What a text encoder's config takes from its tokenizer (CLIP's and T5's alike)."""
    return dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        **_token_ids(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
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


def _tiny_vae(latent_channels: int = 4, **flow_options: float | bool) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        **flow_options,
    )


PipelineT = TypeVar("PipelineT", bound=DiffusionPipeline)


def _assemble(pipeline_class: type[PipelineT], **components: Any) -> PipelineT:
    """The pipeline of ``components``, its models in eval mode and its progress bar off."""
    pipe = pipeline_class(**{k: v.eval() if isinstance(v, torch.nn.Module) else v for k, v in components.items()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32) -> StableDiffusionPipeline:
    """A real ``StableDiffusionPipeline`` of tiny random components, identical for the same ``seed``.

    8x8x4 latents and 16x16 images; the UNet has 7 cross-attention blocks, so 14 ``attn2.to_k``/``attn2.to_v``
    layers. The global torch RNG is left as it was. Built in code, offline: what tests and examples run on.

    Args:
        seed: seeds the random weights; the same seed gives the same pipeline.
        cross_attention_dim: the text encoder's hidden size, which the K/V layers read.

    Returns:
        The pipeline, its models in eval mode and its progress bar off.

    Examples:
        >>> pipe = tiny_pipeline(seed=0)
        >>> pipe("a cat in van gogh style", num_inference_steps=2, output_type="pt").images.shape
        torch.Size([1, 3, 16, 16])
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
    return _assemble(
        StableDiffusionPipeline, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SD1_DDIM_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A real ``StableDiffusionXLPipeline`` of tiny random components (two text encoders, text-time conditioning).

    The UNet's cross-attention input is the concatenation of both encoders' penultimate hidden states (16 + 16).
    The global torch RNG is left as it was.

    Args:
        seed: seeds the random weights; the same seed gives the same pipeline.

    Returns:
        The pipeline, its models in eval mode and its progress bar off.
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
    return _assemble(
        StableDiffusionXLPipeline, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=DDIMScheduler(**SD1_DDIM_CONFIG),
    )


# SD3's and Flux's VAEs shift and scale latents and have no quant convs; the pipelines read these config values.
_SD3_VAE = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
_FLUX_VAE = dict(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
# The sizes both tiny joint-block transformers share: 2 joint blocks of 4 heads x 16 (inner size 64) reading 32-wide
# text states and 32-wide pooled text, on 4-channel latents.
_JOINT_TRANSFORMER = dict(in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                          joint_attention_dim=32, pooled_projection_dim=32)


# Attention bias of a T5 token on itself (relative-position bucket 0; every other bucket 0). SD3 and Flux pad T5
# prompts to 256 / 512 tokens with no attention mask: a random T5 averages each word into that padding (different
# concepts' states at cosine 0.94-0.97), so no prompt differs from another in its tokens. exp(10) against 511 padding
# tokens keeps ~98% of a token's attention on itself, so each word's state stays its own (cosine -0.1 to 0.6 between
# concepts), as a trained T5 keeps content words distinct.
TINY_T5_SELF_ATTENTION_BIAS = 10.0


def _tiny_t5(tokenizer, d_model: int = 32) -> T5EncoderModel:
    config = T5Config(**_token_ids(tokenizer), decoder_start_token_id=tokenizer.pad_token_id, d_model=d_model, d_kv=8,
                      d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
    encoder = T5EncoderModel(config)
    _spread_token_embeddings(encoder)
    with torch.no_grad():  # only the first layer has a relative-position bias; later layers reuse it
        bias = encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # [buckets, heads]
        bias.zero_()
        bias[0] = TINY_T5_SELF_ATTENTION_BIAS  # bucket 0 is distance 0 in both directions
    return encoder


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A real ``StableDiffusion3Pipeline`` of tiny random components, identical for the same ``seed``.

    Two CLIP encoders with projection (hidden 16 each, pooled 16 + 16) and a T5 encoder (d_model 32) feed an
    ``SD3Transformer2DModel`` of 2 joint blocks (inner size 64; the last block is ``context_pre_only``); 8x8x4
    latents and 16x16 images by default. Every joint block's text-stream ``add_k_proj``/``add_v_proj`` is a K/V
    layer to unlearn on (4 layers). Like every SD3 pipeline it pads T5 prompts to ``max_sequence_length`` (256 by
    default). The global torch RNG is left as it was.

    Args:
        seed: seeds the random weights; the same seed gives the same pipeline.

    Returns:
        The pipeline, its models in eval mode and its progress bar off.
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    tokenizer_2 = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    tokenizer_3 = build_t5_tokenizer(TINY_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=16, projection_dim=16))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=16, projection_dim=16))
        _spread_token_embeddings(text_encoder)
        _spread_token_embeddings(text_encoder_2)
        text_encoder_3 = _tiny_t5(tokenizer_3, d_model=32)  # >= 16 + 16: the pipeline pads CLIP states to it
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, caption_projection_dim=64, out_channels=4, pos_embed_max_size=16,
            **_JOINT_TRANSFORMER,
        )
        vae = _tiny_vae(latent_channels=4, **_SD3_VAE)
    return _assemble(
        StableDiffusion3Pipeline, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A real, guidance-distilled ``FluxPipeline`` of tiny random components, identical for the same ``seed``.

    A CLIP encoder (pooled text, 32) and a T5 encoder (d_model 32) feed a ``FluxTransformer2DModel`` with 2 dual-stream
    blocks, 1 single-stream block (inner size 64) and a guidance embedding, as FLUX.1-dev has. Latents are 8x8x1,
    packed 2x2 into 16 tokens of 4 channels. FluxPipeline's default image size is fixed at 128 latent pixels
    (256 px here): pass ``height=16, width=16`` for 16x16 images. It pads T5 prompts to 512 tokens by default.
    The global torch RNG is left as it was.

    Args:
        seed: seeds the random weights; the same seed gives the same pipeline.

    Returns:
        The pipeline, its models in eval mode and its progress bar off.
    """
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=TINY_MAX_LENGTH)
    tokenizer_2 = build_t5_tokenizer(TINY_WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32))
        _spread_token_embeddings(text_encoder)
        text_encoder_2 = _tiny_t5(tokenizer_2, d_model=32)
        transformer = FluxTransformer2DModel(
            patch_size=1, num_single_layers=1, guidance_embeds=True, axes_dims_rope=(4, 4, 8), **_JOINT_TRANSFORMER,
        )
        vae = _tiny_vae(latent_channels=1, **_FLUX_VAE)
    pipe = _assemble(
        FluxPipeline, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
            shift=3.0, use_dynamic_shifting=True,
        ),
    )
    pipe.default_sample_size = 8  # FluxPipeline hard-codes 128 (1024 px images on FLUX.1)
    return pipe
