"""GPU check: ESD training steps on a UNet with Stable Diffusion 1.5's real architecture, this design vs naive.

    python benchmarks/gpu_check.py [--steps 20] [--sampling-steps 50]     # needs CUDA; skips cleanly without
    python benchmarks/gpu_check.py --tiny                                 # the same code path on the tiny pipeline

Builds SD 1.5's UNet (its published config), a CLIP ViT-L/14-sized text encoder and SD's VAE with random weights
(no download), in bf16 on the GPU, and trains ESD requests at 512x512 (64x64 latents): this design without and with
gradient projection, and the naive baseline (benchmarks/naive_esd.py: a second frozen UNet, a fresh rollout per
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
        pipe = du.testing.tiny_pipeline(seed=0).to(args.device, args.dtype)
    else:
        pipe = build_sd15(args.device, args.dtype)
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
    else:
        regularizers = [du.GradientProjection(retain=["monet"])] if variant == "ours+projection" else []
        training = du.TrainingConfig(steps=args.steps, learning_rate=1e-5,
                                     mixed_precision="bf16" if args.dtype == torch.bfloat16 else "no")
        record = pipe.unlearn("van gogh", prompts=[PROMPT], seed=0, training=training, regularizers=regularizers,
                              sampling_steps=args.sampling_steps, num_trajectories=1, progress=False)
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
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
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
    print(f"device: {name}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
          f"{'tiny' if args.tiny else 'SD 1.5 UNet (random weights)'}, {args.dtype}, {args.steps} ESD steps, "
          f"{args.sampling_steps}-step DDIM trajectories\n", flush=True)
    measure(args, "ours")  # warm-up: kernels, cuDNN/cuBLAS heuristics, allocator
    results = [measure(args, v) for v in ("ours", "ours+projection", "naive")]
    rows = []
    for r in results:
        rows.append([r["variant"], f"{r['seconds_per_step_loop'] * 1000:.1f}",
                     f"{1 / r['seconds_per_step_loop']:.2f}", f"{r['seconds_per_step_total'] * 1000:.1f}",
                     f"{r.get('peak_gib', float('nan')):.2f}", f"{r.get('peak_above_weights_gib', float('nan')):.2f}"])
    print(table(rows, ["variant", "loop ms/step", "loop steps/s", "ms/step incl. setup", "peak GiB",
                       "peak above weights GiB"]))
    ours, projected, naive = results
    print(f"\nspeed-up incl. setup: {naive['seconds_per_step_total'] / ours['seconds_per_step_total']:.2f}x; "
          f"loop: {naive['seconds_per_step_loop'] / ours['seconds_per_step_loop']:.2f}x; "
          f"projection overhead (loop): {(projected['seconds_per_step_loop'] / ours['seconds_per_step_loop'] - 1) * 100:+.1f}%")
    if "peak_gib" in ours:
        print(f"peak memory: ours {ours['peak_gib']:.2f} GiB vs naive {naive['peak_gib']:.2f} GiB "
              f"({naive['peak_gib'] - ours['peak_gib']:.2f} GiB saved)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
