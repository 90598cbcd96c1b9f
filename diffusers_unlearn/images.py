"""Batched, seeded image generation (for evaluation and model checks) and image conversion.

Every image gets its own CPU ``torch.Generator`` seeded with its seed, so an image depends only on its prompt and
seed (not on the batch size, the order or the device), and two evaluations of the same model agree image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ._validation import check_int

Images = Union[torch.Tensor, Sequence[Image.Image]]


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
    Each image has its own seeded generator, so an image does not depend on the batch it falls in.

    Args:
        pipe: any diffusers text-to-image pipeline.
        prompts: one prompt per image.
        seeds: one seed per image.
        num_inference_steps: the pipeline's sampling steps.
        guidance_scale: the pipeline's classifier-free guidance scale.
        batch_size: images per pipeline call.
        height: image height (None: the pipeline's default).
        width: image width (None: the pipeline's default).
        progress: show one progress bar for the whole set.
        desc: the progress bar's label.

    Returns:
        ``[N, 3, H, W]`` float32 on the CPU, in [0, 1].

    Raises:
        ValueError: prompts and seeds differ in number, no prompts, or a batch size below 1.
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


def to_pil(images: Images) -> list[Image.Image]:
    """Images as a list of RGB PIL images, whatever form a pipeline or a classifier handed them in.

    Args:
        images: a ``[B, 3, H, W]`` (or ``[3, H, W]``) tensor in [0, 1], one PIL image, or a sequence of PIL images.

    Returns:
        One RGB PIL image per input image (tensor values clamped to [0, 1] and rounded to 8 bits).

    Raises:
        ValueError: a tensor of another shape.
        TypeError: a sequence item that is not a PIL image.

    Examples:
        >>> import torch
        >>> [image.size for image in to_pil(torch.zeros(2, 3, 4, 5))]
        [(5, 4), (5, 4)]
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image tensor of shape [B, 3, H, W], got {tuple(images.shape)}")
        arrays = (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        return [Image.fromarray(a, "RGB") for a in arrays]
    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL images or a [B, 3, H, W] tensor, got {type(image).__name__}")
        out.append(image.convert("RGB"))
    return out
