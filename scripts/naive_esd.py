"""The straightforward ESD baseline the design is measured against (benchmarks only, not part of the library).

What a direct port of ESD's training loop does: a second, frozen copy of the UNet, and at every step a fresh
DDIM rollout of that copy from noise to a random step t (with classifier-free guidance), two frozen predictions
at x_t, then one forward/backward of the adapted UNet. The adapter is the same peft LoRA on attn2.to_k/to_v.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig

from diffusers_unlearn.families.conditioning import TextConditioner, sampling_scheduler


def naive_esd(pipe, prompt: str, *, steps: int, sampling_steps: int, rank: int = 4, learning_rate: float = 1e-4,
              guidance_scale: float = 3.0, negative_guidance: float = 1.0, seed: int = 0,
              resolution: int | None = None) -> dict[str, float]:
    """Train ESD the naive way on ``pipe.unet``; returns timing. Leaves a LoRA adapter named "naive" on the UNet."""
    started = time.perf_counter()
    unet = pipe.unet
    frozen = copy.deepcopy(unet).requires_grad_(False)
    cond = TextConditioner(pipe)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["attn2.to_k", "attn2.to_v"]), "naive")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    c, u = cond.encode([prompt]), cond.encode_unconditional(1)
    both = type(c).cat([u, c])
    generator = torch.Generator().manual_seed(seed)
    loop_started = time.perf_counter()
    for _ in range(steps):
        scheduler = sampling_scheduler(pipe, sampling_steps)
        stop = int(torch.randint(0, sampling_steps, (1,), generator=generator))
        latents = torch.randn(cond.latent_shape(1, resolution), generator=generator).to(unet.device)
        latents = latents * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps[:stop]:
                model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                noise_u, noise_c = cond.predict_noise(frozen, model_in, t, both).float().chunk(2)
                latents = scheduler.step(noise_u + guidance_scale * (noise_c - noise_u), t, latents).prev_sample
            t = scheduler.timesteps[stop]
            empty, concept = cond.predict_noise(frozen, torch.cat([latents, latents]), t, both).float().chunk(2)
            target = empty - negative_guidance * (concept - empty)
        prediction = cond.predict_noise(unet, latents, t, c)
        loss = F.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    finished = time.perf_counter()
    return {"seconds": finished - started, "loop_seconds": finished - loop_started,
            "seconds_per_step": (finished - started) / steps}
