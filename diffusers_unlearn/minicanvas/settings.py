"""Recommended sampling settings of the shipped MiniCanvas model (measured by ``minicanvas.quality``)."""

from __future__ import annotations

RESOLUTION = 32  # pixels; the UNet works on 16 x 16 x 4 latents
NUM_INFERENCE_STEPS = 20  # DDIM steps (15 to 25 measured equally good; 20 leaves a margin)
GUIDANCE_SCALE = 5.0  # classifier-free guidance
# Generation seeds of the evaluation, as in UnlearnCanvas (one image per prompt and seed).
EVAL_SEEDS: list[int] = [188, 288, 588, 688, 888]
