"""Audit images: the same prompt and seed on the base, on all requests, on one request alone and on all but it."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from .._validation import check_count, check_number, check_seed
from .state import check_request_id, rebuild

PANELS = ("base", "all", "only", "without")
_LABEL_HEIGHT = 22
_GAP = 4  # white space between tiles
_MIN_TILE = 256


def audit_images(
    pipe: Any,
    request_id: str,
    prompt: str,
    *,
    num_inference_steps: int = 30,
    seed: int = 0,
    guidance_scale: float | None = None,
    **pipe_kwargs: Any,
) -> dict[str, Image.Image]:
    """One image per panel of ``PANELS``, all from the same prompt and seed.

    "base" has no request active, "all" every request of the ledger, "only" that request alone (as
    ``pipe.audit(request_id)``), "without" all but it (``mode="without"``). The pipeline's state is the same
    afterwards, also when generation fails.
    """
    check_request_id(pipe, request_id)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    check_seed(seed)
    check_count(num_inference_steps, "num_inference_steps")
    if guidance_scale is not None:
        check_number(guidance_scale, "guidance_scale", minimum=0)

    labels = panel_labels(pipe, request_id)

    def generate(panel: str) -> Image.Image:
        kwargs = dict(pipe_kwargs)
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        generator = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on every device
        config = getattr(pipe, "_progress_bar_config", None)
        pipe._progress_bar_config = {**(config or {}), "desc": f"audit panel {panel}: {labels[panel]}"}
        try:  # the pipeline's own bar, labelled with the panel it draws
            return pipe(prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="pil",
                        **kwargs).images[0]
        finally:
            if config is None:
                del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = config

    images: dict[str, Image.Image] = {}
    try:
        rebuild(pipe, [])  # no request active: the base model
        images["base"] = generate("base")
    finally:
        rebuild(pipe)
    images["all"] = generate("all")
    with pipe.audit(request_id):
        images["only"] = generate("only")
    with pipe.audit(request_id, mode="without"):
        images["without"] = generate("without")
    return images


def panel_labels(pipe: Any, request_id: str) -> dict[str, str]:
    """Captions of the audit panels."""
    ledger = pipe.unlearning_ledger
    concept = ledger.get(request_id).concept
    return {
        "base": "base (no request)",
        "all": f"all {len(ledger.requests)} request(s)",
        "only": f"only {request_id} ({concept})",
        "without": f"all but {request_id}",
    }


def _label_text(text: str, width: int, font: Any, draw: ImageDraw.ImageDraw) -> str:
    # The default bitmap font has ASCII glyphs only; concepts are user text: keep printable ASCII and fit the tile.
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    if draw.textlength(text, font=font) <= width - 8:
        return text
    while text and draw.textlength(text + "...", font=font) > width - 8:
        text = text[:-1]
    return text + "..."


def image_grid(images: list[tuple[str, Image.Image]], columns: int = 2, tile: int | None = None) -> Image.Image:
    """Tiles with a caption band above each, ``columns`` per row; small images are enlarged (nearest) to ``tile``
    pixels (default: at least 256) so that tiny test images stay visible."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    size = tile or max(_MIN_TILE, max(max(im.size) for _, im in images))
    rows = (len(images) + columns - 1) // columns
    step_x, step_y = size + _GAP, size + _LABEL_HEIGHT + _GAP
    grid = Image.new("RGB", (columns * step_x - _GAP, rows * step_y - _GAP), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index, (label, image) in enumerate(images):
        x, y = (index % columns) * step_x, (index // columns) * step_y
        draw.text((x + 4, y + 4), _label_text(label, size, font, draw), fill="black", font=font)
        scale = size / max(image.size)  # keep the aspect ratio inside the square tile
        tile_image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                                 Image.NEAREST)
        grid.paste(tile_image, (x, y + _LABEL_HEIGHT))
    return grid


def audit_grid(pipe: Any, request_id: str, prompt: str, **kwargs: Any) -> Image.Image:
    """A 2x2 grid of the audit panels (base, all, only, without) with captions; see ``audit_images``."""
    images = audit_images(pipe, request_id, prompt, **kwargs)
    labels = panel_labels(pipe, request_id)
    return image_grid([(labels[name], images[name]) for name in PANELS], columns=2)


__all__ = ["PANELS", "audit_grid", "audit_images", "image_grid", "panel_labels"]
