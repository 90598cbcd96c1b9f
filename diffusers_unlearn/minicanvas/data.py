"""MiniCanvas image set: synthetic style x object images rendered deterministically with numpy and PIL.

In the spirit of UnlearnCanvas: the object decides the shape, the style decides palette, texture and stroke.
Styles come in families that share a word and a palette ("neon lines", "neon waves", "neon dots"), and some
share a texture word across families ("neon dots", "pastel dots"), so that concepts have near neighbours both in
text-embedding space and in pixel space.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "OBJECTS",
    "PROMPT_TEMPLATE",
    "STYLES",
    "STYLE_FAMILIES",
    "VOCABULARY",
    "prompt",
    "render",
    "render_batch",
]

PROMPT_TEMPLATE = "a {object} in {style} style"

# Render at SUPERSAMPLE x the output size and downsample, so edges and thin strokes are anti-aliased.
SUPERSAMPLE = 4
_CANVAS = 128  # the geometry below is written for a 128 px canvas and scaled to the render size


def prompt(style: str, obj: str) -> str:
    """The training / evaluation prompt for one style and object."""
    if style not in _STYLE_SPECS:
        raise ValueError(f"unknown style {style!r}; allowed: {STYLES}")
    if obj not in _OBJECT_DRAWERS:
        raise ValueError(f"unknown object {obj!r}; allowed: {OBJECTS}")
    return PROMPT_TEMPLATE.format(object=obj, style=style)


# --------------------------------------------------------------------------------------------------- textures
# Each texture maps pixel coordinates (float arrays on the canvas) and a random generator to a field in [0, 1];
# the style then mixes two colours by that field.

Texture = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _smoothstep(x: np.ndarray, edge: float = 0.12) -> np.ndarray:
    # Soft threshold at 0 so stripes stay anti-aliased after downsampling.
    return np.clip(0.5 + x / (2 * edge), 0.0, 1.0)


def _lines(period: float, width: float = 0.5) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        angle = math.radians(45 + rng.uniform(-12, 12))
        p = period * rng.uniform(0.9, 1.1)
        u = (x * math.cos(angle) + y * math.sin(angle)) / p + rng.uniform(0, 1)
        return _smoothstep(width / 2 - np.abs(u - np.round(u)), 0.08)

    return tex


def _waves(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        amp = p * rng.uniform(0.35, 0.5)
        wl = p * rng.uniform(2.2, 2.8)
        u = (y + amp * np.sin(2 * np.pi * x / wl + rng.uniform(0, 2 * np.pi))) / p + rng.uniform(0, 1)
        return _smoothstep(np.sin(2 * np.pi * u), 0.25)

    return tex


def _dots(period: float, radius: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        ox, oy = rng.uniform(0, p, size=2)
        # Hexagonal packing: every other row shifted by half a period.
        row = np.floor((y + oy) / p)
        xs = x + ox + (row % 2) * p / 2
        dx = (xs % p) - p / 2
        dy = ((y + oy) % p) - p / 2
        r = np.sqrt(dx * dx + dy * dy)
        return _smoothstep((radius * p - r) / p, 0.06)

    return tex


def _checks(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        ox, oy = rng.uniform(0, p, size=2)
        return _smoothstep(np.sin(np.pi * (x + ox) / p) * np.sin(np.pi * (y + oy) / p), 0.2)

    return tex


def _hatching(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        a = math.radians(45 + rng.uniform(-8, 8))
        u = (x * math.cos(a) + y * math.sin(a)) / p + rng.uniform(0, 1)
        v = (x * math.cos(-a) + y * math.sin(-a)) / p + rng.uniform(0, 1)
        d = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v)))
        return _smoothstep(0.16 - d, 0.06)

    return tex


def _wash() -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Low-frequency blotches: a few random sinusoids, as watercolour-like uneven wash.
        f = np.zeros_like(x)
        for _ in range(3):
            k = rng.uniform(0.02, 0.05) * 128 / _CANVAS
            th = rng.uniform(0, 2 * np.pi)
            f += np.sin(k * (x * math.cos(th) + y * math.sin(th)) + rng.uniform(0, 2 * np.pi))
        return np.clip(0.5 + f / 4, 0.0, 1.0)

    return tex


def _vertical_gradient() -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = y / y.max() + rng.uniform(-0.1, 0.1)
        return np.clip(g, 0.0, 1.0)

    return tex


def _mosaic(cell: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = cell * rng.uniform(0.9, 1.1)
        ox, oy = rng.uniform(0, c, size=2)
        ix = np.floor((x + ox) / c).astype(int)
        iy = np.floor((y + oy) / c).astype(int)
        n = int(ix.max() + 2), int(iy.max() + 2)
        values = rng.uniform(0.0, 1.0, size=n)
        field = values[ix, iy]
        # Dark grout between tiles: field value -1 marks grout (mapped to the style's stroke colour).
        gx = ((x + ox) % c) < c * 0.14
        gy = ((y + oy) % c) < c * 0.14
        return np.where(gx | gy, -1.0, field)

    return tex


def _flat() -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.zeros_like(x)

    return tex


# --------------------------------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class _Style:
    family: str
    bg: tuple[tuple[int, int, int], tuple[int, int, int]]  # background colours mixed by bg_texture
    bg_texture: Texture
    fg: tuple[tuple[int, int, int], tuple[int, int, int]]  # object colours mixed by fg_texture
    fg_texture: Texture
    stroke: tuple[int, int, int]
    stroke_width: float  # on the 128 px canvas
    fill: bool = True  # False: outline only
    soft_edge: float = 0.0  # blur radius of the object mask (128 px canvas), for wash-like styles


# Families share the background and the main colour; each member has its own second colour and texture, so that
# neighbours are close but separable even where a generator blurs the texture.
_NEON_BG = ((8, 6, 24), (40, 24, 84))
_NEON = (255, 40, 200)
_PASTEL_BG = ((250, 236, 226), (226, 238, 246))
_PASTEL = (250, 140, 186)
_INK_BG = ((244, 240, 228), (226, 220, 204))
_INK = (20, 20, 24)
_PAPER = (244, 240, 228)
_SUNSET_BG = ((255, 170, 60), (120, 40, 120))
_PLUM = (60, 20, 40)

_STYLE_SPECS: dict[str, _Style] = {
    "neon lines": _Style("neon", _NEON_BG, _lines(36), (_NEON, (30, 240, 255)), _lines(26), (255, 255, 255), 3),
    "neon waves": _Style("neon", _NEON_BG, _waves(36), (_NEON, (120, 255, 60)), _waves(26), (255, 255, 255), 3),
    "neon dots": _Style("neon", _NEON_BG, _dots(36, 0.2), (_NEON, (255, 235, 40)), _dots(26, 0.3), (255, 255, 255),
                        3),
    "pastel waves": _Style("pastel", _PASTEL_BG, _waves(36), (_PASTEL, (104, 196, 226)), _waves(26), (170, 120, 170),
                           4),
    "pastel dots": _Style("pastel", _PASTEL_BG, _dots(36, 0.2), (_PASTEL, (120, 210, 150)), _dots(26, 0.3),
                          (170, 120, 170), 4),
    "pastel checks": _Style("pastel", _PASTEL_BG, _checks(36), (_PASTEL, (170, 150, 230)), _checks(26),
                            (170, 120, 170), 4),
    "ink sketch": _Style("ink", _INK_BG, _wash(), (_PAPER, _PAPER), _flat(), _INK, 5, fill=False),
    "ink wash": _Style("ink", _INK_BG, _wash(), ((70, 74, 88), (150, 154, 166)), _wash(), (70, 74, 88), 0,
                       soft_edge=5.0),
    "ink hatching": _Style("ink", _INK_BG, _wash(), (_PAPER, _INK), _hatching(20), _INK, 4),
    "sunset gradient": _Style("sunset", _SUNSET_BG, _vertical_gradient(), ((40, 12, 40), (70, 20, 50)),
                              _vertical_gradient(), (40, 12, 40), 0),
    "sunset mosaic": _Style("sunset", ((255, 190, 70), (230, 90, 60)), _mosaic(30), ((110, 30, 110), (60, 20, 90)),
                            _mosaic(20), _PLUM, 3),
    "sunset lines": _Style("sunset", _SUNSET_BG, _vertical_gradient(), ((255, 230, 110), (120, 30, 90)), _lines(26),
                           _PLUM, 3),
}

STYLES: list[str] = list(_STYLE_SPECS)
STYLE_FAMILIES: dict[str, list[str]] = {}
for _name, _spec in _STYLE_SPECS.items():
    STYLE_FAMILIES.setdefault(_spec.family, []).append(_name)


# --------------------------------------------------------------------------------------------------- objects
# Each drawer paints a white silhouette, centred on a 128 px canvas and about 80 px tall, into an "L" image.

Drawer = Callable[[ImageDraw.ImageDraw], None]


def _bear(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((30, 56, 98, 110), fill=255)  # round body
    d.ellipse((40, 26, 88, 68), fill=255)  # head
    d.ellipse((34, 18, 54, 38), fill=255)  # round ears
    d.ellipse((74, 18, 94, 38), fill=255)
    d.ellipse((30, 96, 52, 114), fill=255)  # feet
    d.ellipse((76, 96, 98, 114), fill=255)


def _cat(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((44, 58, 84, 112), fill=255)  # slim sitting body
    d.ellipse((46, 32, 82, 64), fill=255)  # head
    d.polygon([(46, 46), (48, 14), (64, 36)], fill=255)  # pointed ears
    d.polygon([(82, 46), (80, 14), (64, 36)], fill=255)
    d.line([(82, 104), (104, 100), (112, 80), (104, 62)], fill=255, width=8, joint="curve")  # tail


def _tower(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((50, 34, 78, 114), fill=255)  # tall shaft
    d.rectangle((44, 26, 84, 38), fill=255)  # parapet
    for x in (44, 58, 72):  # crenellations
        d.rectangle((x, 14, x + 10, 28), fill=255)


def _fish(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((22, 42, 88, 86), fill=255)  # body
    d.polygon([(82, 64), (112, 40), (112, 88)], fill=255)  # tail
    d.polygon([(44, 46), (62, 28), (70, 46)], fill=255)  # dorsal fin
    d.ellipse((34, 56, 42, 64), fill=0)  # eye


def _tree(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((58, 78, 70, 114), fill=255)  # trunk
    d.polygon([(64, 12), (30, 58), (98, 58)], fill=255)  # stacked fir layers
    d.polygon([(64, 34), (24, 84), (104, 84)], fill=255)


def _house(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((32, 58, 96, 112), fill=255)  # walls
    d.polygon([(22, 62), (64, 22), (106, 62)], fill=255)  # roof
    d.rectangle((56, 82, 72, 112), fill=0)  # door
    d.rectangle((40, 68, 50, 78), fill=0)  # windows
    d.rectangle((78, 68, 88, 78), fill=0)


_OBJECT_DRAWERS: dict[str, Drawer] = {
    "bear": _bear,
    "cat": _cat,
    "tower": _tower,
    "fish": _fish,
    "tree": _tree,
    "house": _house,
}
OBJECTS: list[str] = list(_OBJECT_DRAWERS)

# Every word a prompt uses; the shipped tokenizer makes each of them one token.
VOCABULARY: list[str] = sorted(
    {w for s in STYLES for w in s.split()}
    | set(OBJECTS)
    | set(PROMPT_TEMPLATE.replace("{object}", "").replace("{style}", "").split())
    | {"image", "photo", "of", "the", "an", "picture", "painting", "drawing", "portrait", "city", "field", "style"}
)


# --------------------------------------------------------------------------------------------------- render


def _rng(style: str, obj: str, seed: int) -> np.random.Generator:
    # A stable hash (not Python's salted hash()) so that renders are identical across processes.
    digest = hashlib.sha256(f"{style}|{obj}|{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _mix(field: np.ndarray, colours: tuple[tuple[int, int, int], tuple[int, int, int]],
         stroke: tuple[int, int, int], jitter: np.ndarray) -> np.ndarray:
    c0 = np.clip(np.asarray(colours[0], np.float32) + jitter, 0, 255)
    c1 = np.clip(np.asarray(colours[1], np.float32) + jitter, 0, 255)
    f = np.clip(field, 0.0, 1.0)[..., None]
    out = c0 * (1 - f) + c1 * f
    grout = (field < 0)[..., None]  # mosaic grout
    return np.where(grout, np.asarray(stroke, np.float32), out)


def _object_mask(obj: str, rng: np.random.Generator, size: int) -> Image.Image:
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    _OBJECT_DRAWERS[obj](ImageDraw.Draw(canvas))
    scale = rng.uniform(0.75, 1.05)
    angle = rng.uniform(-15, 15)
    tx, ty = rng.uniform(-12, 12, size=2)
    # Affine map from output to input coordinates: rotate + scale about the centre, then translate.
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    c = _CANVAS / 2
    inv = (cos, sin, c - cos * (c + tx) - sin * (c + ty), -sin, cos, c + sin * (c + tx) - cos * (c + ty))
    mask = canvas.transform((_CANVAS, _CANVAS), Image.Transform.AFFINE, inv, resample=Image.Resampling.BILINEAR)
    return mask.resize((size, size), Image.Resampling.BILINEAR) if size != _CANVAS else mask


def render(style: str, obj: str, seed: int, size: int = 32) -> Image.Image:
    """Render one ``size`` x ``size`` RGB image of ``obj`` in ``style``; identical for identical arguments."""
    if style not in _STYLE_SPECS:
        raise ValueError(f"unknown style {style!r}; allowed: {STYLES}")
    if obj not in _OBJECT_DRAWERS:
        raise ValueError(f"unknown object {obj!r}; allowed: {OBJECTS}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    spec = _STYLE_SPECS[style]
    rng = _rng(style, obj, seed)
    big = size * SUPERSAMPLE
    k = _CANVAS / big  # texture periods are in 128 px canvas units
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) * k
    jitter = rng.uniform(-14, 14, size=3).astype(np.float32)

    background = _mix(spec.bg_texture(xx, yy, rng), spec.bg, spec.stroke, jitter)
    foreground = _mix(spec.fg_texture(xx, yy, rng), spec.fg, spec.stroke, jitter)

    mask_img = _object_mask(obj, rng, big)
    if spec.soft_edge:
        mask_img = mask_img.filter(ImageFilter.GaussianBlur(spec.soft_edge / k))
    mask = np.asarray(mask_img, np.float32)[..., None] / 255.0
    if spec.fill:
        out = background * (1 - mask) + foreground * mask
    else:
        out = background
    if spec.stroke_width:
        # Outline = dilated mask minus eroded mask, drawn in the stroke colour.
        w = max(3, int(round(spec.stroke_width / k)) | 1)
        outer = np.asarray(mask_img.filter(ImageFilter.MaxFilter(w)), np.float32) / 255.0
        inner = np.asarray(mask_img.filter(ImageFilter.MinFilter(w)), np.float32) / 255.0
        edge = np.clip(outer - inner, 0.0, 1.0)[..., None]
        if spec.fill:
            edge = edge * 0.9
        out = out * (1 - edge) + np.asarray(spec.stroke, np.float32) * edge
    img = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")
    return img.resize((size, size), Image.Resampling.BOX)


def render_batch(pairs: list[tuple[str, str, int]], size: int = 32) -> np.ndarray:
    """Render ``(style, object, seed)`` triples into a uint8 array ``[N, size, size, 3]``."""
    out = np.empty((len(pairs), size, size, 3), np.uint8)
    for i, (style, obj, seed) in enumerate(pairs):
        out[i] = np.asarray(render(style, obj, seed, size))
    return out
