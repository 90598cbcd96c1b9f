"""Batched, seeded image generation for evaluation.

Every image gets its own CPU ``torch.Generator`` seeded with its seed, so an image depends only on its prompt and
seed (not on the batch size, the order or the device), and two evaluations of the same model agree image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .._validation import check_int


def _progress_config(pipe: Any) -> dict[str, Any]:
    return dict(getattr(pipe, "_progress_bar_config", {}) or {})


@torch.no_grad()
def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> torch.Tensor:
    """One image per ``(prompts[i], seeds[i])`` as a float tensor ``[N, 3, H, W]`` in [0, 1], on the CPU.

    Images are generated ``batch_size`` at a time with the pipeline's own ``__call__`` (its scheduler, its
    classifier-free guidance); one progress bar covers the whole set and the pipeline's per-step bar is silenced.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    check_int(batch_size, "batch_size", minimum=1)
    if not prompts:
        raise ValueError("nothing to generate: no prompts")
    saved = _progress_config(pipe)
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    chunks: list[torch.Tensor] = []
    try:
        with tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, len(prompts), batch_size):
                batch_prompts = list(prompts[start : start + batch_size])
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
                out = pipe(
                    batch_prompts,
                    generator=generators,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    output_type="pt",
                )
                chunks.append(out.images.detach().float().cpu().clamp(0.0, 1.0))
                bar.update(len(batch_prompts))
    finally:
        # set_progress_bar_config merges keys, so put back exactly the dict the pipeline had
        pipe._progress_bar_config = saved
    return torch.cat(chunks)
