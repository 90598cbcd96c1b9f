"""GPU check: ESD training steps on a UNet with Stable Diffusion 1.5's real architecture, this design vs naive;
and on an SD3-medium-size or Flux-size transformer (bf16 model, gradient checkpointing, float32 adapters).

    python scripts/gpu_check.py [--steps 20] [--sampling-steps 50]     # needs CUDA; skips cleanly without
    python scripts/gpu_check.py --tiny                                 # the same code path on the tiny pipeline
    python scripts/gpu_check.py --model sd3 [--layers 24]              # SD3-medium's transformer, all 24 blocks
    python scripts/gpu_check.py --model flux [--layers 19 --single-layers 38]   # FLUX.1-dev's (12B): full depth
    python scripts/gpu_check.py --model flux --tiny                    # tiny Flux: the code path on the CPU

Transformer mode: the transformer is built from its published config with random weights, in bf16, with its depth
scaled down by --layers / --single-layers when one GPU cannot hold it (the defaults fit 1 x 80 GB for SD3; Flux's
12B parameters take 24 GB in bf16, so full depth fits an 80 GB GPU). The text encoders keep their widths (CLIP-L,
CLIP-G, T5 d_model 4096, as the transformer reads them) but only 2 layers each: they run once per request, frozen.
ESD requests train on the text-stream add_k_proj / add_v_proj of every joint block, without and with gradient
projection (per-block states), with gradient checkpointing; prints seconds per step and peak GPU memory.

Builds SD 1.5's UNet (its published config), a CLIP ViT-L/14-sized text encoder and SD's VAE with random weights
(no download), in bf16 on the GPU, and trains ESD requests at 512x512 (64x64 latents): this design without and with
gradient projection, and the naive baseline (scripts/naive_esd.py: a second frozen UNet, a fresh rollout per
step). Prints seconds per step (loop only, and including the one-off setup), steps/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _measure import table  # noqa: E402

# runwayml/stable-diffusion-v1-5, unet/config.json (the architecture only; weights are random here)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)
# stable-diffusion-v1-5, vae/config.json
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, act_fn="silu",
)
PROMPT = "a painting in the style of van gogh"

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (architecture only, random weights)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# the 16-channel VAE both use (SD3's scaling/shift; Flux's differ only in those two numbers)
FLOW_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024, act_fn="silu",
                use_quant_conv=False, use_post_quant_conv=False)


def _clip(tokenizer, hidden: int, heads: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_attention_heads=heads, num_hidden_layers=2, max_position_embeddings=77,
                            projection_dim=projection, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                   num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def build_flow_transformer_pipeline(model: str, device: str, dtype: torch.dtype, layers: int | None,
                                    single_layers: int | None):
    """SD3-medium's or FLUX.1-dev's transformer at its published width, depth as asked, random weights."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    from diffusers_unlearn._tokenizer import build_clip_tokenizer, build_t5_tokenizer
    from diffusers_unlearn.testing import TINY_WORDS

    clip_tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=77)
    t5_tokenizer = build_t5_tokenizer(TINY_WORDS)
    torch.manual_seed(0)
    with torch.device(device):
        if model == "sd3":
            config = dict(SD3_MEDIUM, num_layers=layers or SD3_MEDIUM["num_layers"])
            transformer = SD3Transformer2DModel(**config)
            vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.0609, scaling_factor=1.5035)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                text_encoder=_clip(clip_tokenizer, 768, 12, 768, True), tokenizer=clip_tokenizer,
                text_encoder_2=_clip(clip_tokenizer, 1280, 20, 1280, True), tokenizer_2=clip_tokenizer,
                text_encoder_3=_t5(t5_tokenizer), tokenizer_3=t5_tokenizer)
        else:
            config = dict(FLUX_DEV, num_layers=layers or FLUX_DEV["num_layers"],
                          num_single_layers=FLUX_DEV["num_single_layers"] if single_layers is None else single_layers)
            transformer = FluxTransformer2DModel(**config)
            vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.1159, scaling_factor=0.3611)
            pipe = FluxPipeline(
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256,
                                                          max_image_seq_len=4096),
                vae=vae, text_encoder=_clip(clip_tokenizer, 768, 12, 768, False), tokenizer=clip_tokenizer,
                text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer, transformer=transformer)
    params = sum(p.numel() for p in transformer.parameters())
    return pipe.to(device, dtype), config, params


def build_sd15(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_unlearn._tokenizer import build_clip_tokenizer
    from diffusers_unlearn.testing import TINY_WORDS

    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=77)
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly on the GPU
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device, dtype)


def build(args):
    import diffusers_unlearn as du

    if args.tiny:
        builder = {"sd15": du.testing.tiny_pipeline, "sd3": du.testing.tiny_sd3_pipeline,
                   "flux": du.testing.tiny_flux_pipeline}[args.model]
        pipe = builder(seed=0).to(args.device, args.dtype)
    elif args.model == "sd15":
        pipe = build_sd15(args.device, args.dtype)
    else:
        pipe, args.config, args.parameters = build_flow_transformer_pipeline(
            args.model, args.device, args.dtype, args.layers, args.single_layers)
    pipe.set_progress_bar_config(disable=True)
    return du.attach(pipe)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, variant: str) -> dict:
    from naive_esd import naive_esd

    import diffusers_unlearn as du

    pipe = build(args)
    synchronize(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    started = time.perf_counter()
    if variant == "naive":
        with torch.autocast(args.device.split(":")[0], dtype=args.dtype, enabled=args.dtype != torch.float32):
            timing = naive_esd(pipe, PROMPT, steps=args.steps, sampling_steps=args.sampling_steps)
    elif variant == "floor":  # LoRA forward + backward + AdamW at batch 1, nothing else (step_vs_floor.py)
        from step_vs_floor import floor_seconds_per_step

        with torch.no_grad():
            text_states = pipe.encode_prompt(PROMPT, args.device, 1, False)[0]
        per_step = floor_seconds_per_step(pipe.unet, text_states, args.steps,
                                          autocast_dtype=args.dtype if args.dtype != torch.float32 else None)
        timing = {"loop_seconds": per_step * args.steps}
    else:
        regularizers = [du.GradientProjection(keep=["monet"])] if variant == "ours+projection" else []
        training = du.TrainingConfig(steps=args.steps, learning_rate=1e-5,
                                     mixed_precision="bf16" if args.dtype == torch.bfloat16 else "no",
                                     gradient_checkpointing=args.model != "sd15")
        resolution = None if args.tiny or args.model == "sd15" else args.resolution
        record = pipe.unlearn("van gogh", prompts=[PROMPT], seed=0, training=training, regularizers=regularizers,
                              sampling_steps=args.sampling_steps, num_trajectories=1, progress=False,
                              resolution=resolution)
        assert all(t.dtype == torch.float32 for t in pipe.request_adapter(record.request_id).tensors.values())
        timing = dict(record.timing, seconds=record.seconds)
    synchronize(args.device)
    total = time.perf_counter() - started
    result = {
        "variant": variant,
        "total_seconds": total,
        "seconds_per_step_total": total / args.steps,
        "seconds_per_step_loop": timing["loop_seconds"] / args.steps,
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_above_weights_gib"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="tiny pipeline (runs on the CPU too)")
    parser.add_argument("--model", choices=("sd15", "sd3", "flux"), default="sd15",
                        help="SD 1.5's UNet (default), SD3-medium's or FLUX.1-dev's transformer")
    parser.add_argument("--layers", type=int, default=None,
                        help="joint blocks of the transformer (default: the published depth, 24 SD3 / 19 Flux)")
    parser.add_argument("--single-layers", type=int, default=None,
                        help="Flux single-stream blocks (default: 38, the published depth)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="image size of the transformer's training trajectories (default 512: 1024 tokens)")
    parser.add_argument("--cpu", action="store_true",
                        help="run the full-width build on the CPU anyway (slow; checks the script, not a measurement)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny and not args.cpu:
        print("CUDA is not available: skipping the GPU check (use --tiny to run the code path on the CPU).")
        return 0
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
    else:
        name = "CPU"
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # casting random-weight models with .to(dtype) is intended here
    what = {"sd15": "SD 1.5 UNet", "sd3": "SD3-medium transformer", "flux": "FLUX.1-dev transformer"}[args.model]
    print(f"device: {name}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
          f"{'tiny ' + args.model if args.tiny else what + ' (random weights)'}, {args.dtype}, {args.steps} ESD steps, "
          f"{args.sampling_steps}-step trajectories\n", flush=True)
    if args.model != "sd15":
        return transformer_check(args, name)
    measure(args, "ours")  # warm-up: kernels, cuDNN/cuBLAS heuristics, allocator
    results = [measure(args, v) for v in ("ours", "ours+projection", "naive", "floor")]
    rows = []
    for r in results:
        rows.append([r["variant"], f"{r['seconds_per_step_loop'] * 1000:.1f}",
                     f"{1 / r['seconds_per_step_loop']:.2f}", f"{r['seconds_per_step_total'] * 1000:.1f}",
                     f"{r.get('peak_gib', float('nan')):.2f}", f"{r.get('peak_above_weights_gib', float('nan')):.2f}"])
    print(table(rows, ["variant", "loop ms/step", "loop steps/s", "ms/step incl. setup", "peak GiB",
                       "peak above weights GiB"]))
    ours, projected, naive, floor = results
    print(f"\nstep / floor (loop): {ours['seconds_per_step_loop'] / floor['seconds_per_step_loop']:.2f}x "
          f"(goal <= 1.15x)")
    print(f"\nspeed-up incl. setup: {naive['seconds_per_step_total'] / ours['seconds_per_step_total']:.2f}x; "
          f"loop: {naive['seconds_per_step_loop'] / ours['seconds_per_step_loop']:.2f}x; "
          f"projection overhead (loop): {(projected['seconds_per_step_loop'] / ours['seconds_per_step_loop'] - 1) * 100:+.1f}%")
    if "peak_gib" in ours:
        print(f"peak memory: ours {ours['peak_gib']:.2f} GiB vs naive {naive['peak_gib']:.2f} GiB "
              f"({naive['peak_gib'] - ours['peak_gib']:.2f} GiB saved; ours / naive "
              f"{ours['peak_gib'] / naive['peak_gib']:.2f}x, goal <= 0.5x)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": results}, indent=2))
    return 0


def transformer_check(args, name: str) -> int:
    """SD3 / Flux: this design without and with gradient projection (no naive baseline: it needs a second copy of
    the transformer, which the bf16 + checkpointing path exists to avoid)."""
    measure(args, "ours")  # warm-up
    results = [measure(args, v) for v in ("ours", "ours+projection")]
    if not args.tiny:
        print(f"transformer: {args.parameters / 1e9:.2f} B parameters, config {args.config}")
    rows = [[r["variant"], f"{r['seconds_per_step_loop'] * 1000:.1f}", f"{r['seconds_per_step_total'] * 1000:.1f}",
             f"{r.get('peak_gib', float('nan')):.2f}", f"{r.get('peak_above_weights_gib', float('nan')):.2f}"]
            for r in results]
    print(table(rows, ["variant", "loop ms/step", "ms/step incl. setup", "peak GiB", "peak above weights GiB"]))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "model": args.model, "results": results,
                                         "config": getattr(args, "config", None)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
