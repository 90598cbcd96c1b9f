"""MiniCanvas image set: synthetic style x object images rendered deterministically with numpy and PIL.

In the spirit of UnlearnCanvas: the object decides the shape, the style decides palette, texture and stroke.
48 styles in 12 families of four. A style's name is ``"<family> <texture>"``: the family word brings the palette
(background and main colour), the texture word brings a pattern and an accent colour. So members of a family are
near neighbours (shared word and palette), and every texture word is shared by four families ("neon dots",
"pastel dots", "desert dots", "candy dots"): neighbours across families, in text and in pixels.

Prompts come in wordings: ``TRAINING_TEMPLATES`` (the model is trained on these; ``PROMPT_TEMPLATE`` is the first
and the evaluation default) and ``HELDOUT_TEMPLATES`` (never used in training), so that an evaluation can tell
whether a concept is erased or only one of its phrasings.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .._validation import check_int

__all__ = [
    "FAMILY_PALETTES",
    "HELDOUT_TEMPLATES",
    "OBJECTS",
    "PROMPT_TEMPLATE",
    "STYLES",
    "STYLE_FAMILIES",
    "TEXTURE_WORDS",
    "TRAINING_TEMPLATES",
    "VOCABULARY",
    "auxiliary_concepts",
    "prompt",
    "render",
    "render_batch",
]

PROMPT_TEMPLATE = "a {object} in {style} style"
# Wordings of a full prompt used in training; style and object sit at different places and distances.
TRAINING_TEMPLATES: tuple[str, ...] = (
    PROMPT_TEMPLATE,
    "a painting of a {object} in {style} style",
    "an image of a {object} in {style} style",
    "a {object}, {style} style",
    "{style} style picture of a {object}",
    "a {style} {object}",
    "the {object} in {style}",
    "{style} art, a {object}",
)
# Never used in training: other word order, "X-style", "rendered as", unseen filler words.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a {object} rendered as {style}",
    "a {style}-style {object}",
    "an illustration of a {object} done in {style}",
    "{object} with a {style} look",
)

# Render at SUPERSAMPLE x the output size and downsample, so edges and thin strokes are anti-aliased.
SUPERSAMPLE = 4
_CANVAS = 128  # the geometry below is written for a 128 px canvas and scaled to the render size


def prompt(style: str, obj: str, template: str | None = None) -> str:
    """The MiniCanvas prompt for one style and object: what the model was trained on (or a held-out phrasing).

    Args:
        style: one of ``STYLES``.
        obj: one of ``OBJECTS``.
        template: a string with ``{style}`` and ``{object}`` slots (None: ``PROMPT_TEMPLATE``), e.g. one of
            ``HELDOUT_TEMPLATES``.

    Returns:
        The prompt.

    Raises:
        ValueError: an unknown style or object, or a template without both slots (or with other slots).

    Examples:
        >>> prompt("neon dots", "cat")
        'a cat in neon dots style'
        >>> prompt("neon dots", "cat", HELDOUT_TEMPLATES[0])
        'a cat rendered as neon dots'
    """
    if style not in _STYLE_SPECS:
        raise ValueError(f"unknown style {style!r}; allowed: {STYLES}")
    if obj not in _OBJECT_DRAWERS:
        raise ValueError(f"unknown object {obj!r}; allowed: {OBJECTS}")
    template = PROMPT_TEMPLATE if template is None else template
    if not isinstance(template, str) or "{style}" not in template or "{object}" not in template:
        raise ValueError(f"template must be a string with a '{{style}}' and an '{{object}}' slot, got {template!r}")
    try:
        return template.format(object=obj, style=style)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"template {template!r} may only use the slots {{style}} and {{object}} ({exc})") from None


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


def _rings(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        cx, cy = rng.uniform(0, _CANVAS, size=2)
        r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / p
        return _smoothstep(0.25 - np.abs(r - np.round(r)), 0.08)

    return tex


def _grid(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        ox, oy = rng.uniform(0, p, size=2)
        u, v = (x + ox) / p, (y + oy) / p
        d = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v)))
        return _smoothstep(0.12 - d, 0.05)

    return tex


def _zigzag(period: float) -> Texture:
    def tex(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = period * rng.uniform(0.9, 1.1)
        tri = np.abs(((x / p + rng.uniform(0, 1)) % 1.0) - 0.5) * p  # triangle wave along x
        u = (y + tri) / (p / 1.5) + rng.uniform(0, 1)
        return _smoothstep(0.25 - np.abs(u - np.round(u)), 0.08)

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


RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Palette:
    """What a family word brings: background colours, the object's main colour, the outline colour."""

    bg: tuple[RGB, RGB]
    main: RGB
    stroke: RGB


# family -> (palette, its four texture words). Every texture word is used by exactly four families, and any two
# families share at most two texture words, so cross-family neighbours exist without families becoming copies.
FAMILY_PALETTES: dict[str, tuple[_Palette, tuple[str, ...]]] = {
    "neon": (_Palette(((8, 6, 24), (40, 24, 84)), (255, 40, 200), (255, 255, 255)), ("lines", "waves", "dots", "grid")),
    "pastel": (_Palette(((250, 236, 226), (226, 238, 246)), (250, 140, 186), (170, 120, 170)),
               ("waves", "dots", "checks", "rings")),
    "ink": (_Palette(((244, 240, 228), (226, 220, 204)), (20, 20, 24), (20, 20, 24)),
            ("sketch", "wash", "hatching", "lines")),
    "sunset": (_Palette(((255, 170, 60), (120, 40, 120)), (70, 20, 50), (60, 20, 40)),
               ("gradient", "mosaic", "lines", "zigzag")),
    "forest": (_Palette(((20, 60, 30), (60, 110, 50)), (230, 200, 90), (15, 30, 10)),
               ("hatching", "rings", "wash", "zigzag")),
    "ocean": (_Palette(((10, 60, 120), (40, 140, 190)), (250, 250, 240), (5, 30, 60)),
              ("waves", "gradient", "rings", "mosaic")),
    "desert": (_Palette(((235, 205, 150), (205, 155, 95)), (150, 60, 25), (90, 40, 20)),
               ("dots", "zigzag", "checks", "sketch")),
    "candy": (_Palette(((255, 95, 130), (255, 205, 90)), (110, 40, 160), (255, 255, 255)),
              ("checks", "grid", "zigzag", "dots")),
    "metal": (_Palette(((90, 95, 105), (160, 165, 175)), (215, 220, 228), (30, 30, 35)),
              ("grid", "hatching", "mosaic", "sketch")),
    "ember": (_Palette(((25, 6, 6), (110, 22, 12)), (255, 120, 20), (255, 220, 120)),
              ("gradient", "lines", "wash", "rings")),
    "frost": (_Palette(((225, 242, 255), (175, 212, 240)), (60, 110, 200), (250, 250, 255)),
              ("mosaic", "sketch", "grid", "wash")),
    "retro": (_Palette(((240, 200, 60), (40, 150, 140)), (200, 60, 40), (40, 30, 30)),
              ("checks", "waves", "hatching", "gradient")),
}

# What a texture word brings: the pattern (on background and object) and an accent colour mixed into the object.
_ACCENTS: dict[str, RGB] = {
    "lines": (30, 240, 255),
    "waves": (120, 255, 60),
    "dots": (255, 235, 40),
    "checks": (150, 110, 240),
    "grid": (255, 140, 0),
    "rings": (230, 30, 50),
    "zigzag": (255, 255, 255),
    "mosaic": (30, 70, 200),
    "hatching": (244, 240, 228),
    "wash": (120, 130, 160),
    "gradient": (70, 20, 90),
    "sketch": (0, 0, 0),  # outline only: the accent is not drawn
}
TEXTURE_WORDS: list[str] = list(_ACCENTS)


def _make_style(family: str, pal: _Palette, word: str) -> _Style:
    fg = (pal.main, _ACCENTS[word])
    patterned = {
        "lines": (_lines(36), _lines(22)),
        "waves": (_waves(36), _waves(24)),
        "dots": (_dots(36, 0.2), _dots(24, 0.32)),
        "checks": (_checks(36), _checks(24)),
        "grid": (_grid(30), _grid(20)),
        "rings": (_rings(34), _rings(22)),
        "zigzag": (_zigzag(36), _zigzag(24)),
        "mosaic": (_mosaic(30), _mosaic(20)),
    }
    if word in patterned:
        bg_tex, fg_tex = patterned[word]
        return _Style(family, pal.bg, bg_tex, fg, fg_tex, pal.stroke, 3)
    if word == "hatching":
        return _Style(family, pal.bg, _wash(), (_ACCENTS[word], pal.main), _hatching(20), pal.stroke, 4)
    if word == "wash":
        return _Style(family, pal.bg, _wash(), fg, _wash(), pal.stroke, 0, soft_edge=5.0)
    if word == "gradient":
        return _Style(family, pal.bg, _vertical_gradient(), fg, _vertical_gradient(), pal.stroke, 0)
    if word == "sketch":
        return _Style(family, pal.bg, _wash(), fg, _flat(), pal.main, 5, fill=False)
    raise AssertionError(f"no look defined for texture word {word!r}")


_STYLE_SPECS: dict[str, _Style] = {
    f"{family} {word}": _make_style(family, pal, word)
    for family, (pal, words) in FAMILY_PALETTES.items()
    for word in words
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


def _bird(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((34, 50, 90, 86), fill=255)  # body
    d.ellipse((74, 34, 100, 60), fill=255)  # head
    d.polygon([(98, 44), (118, 50), (98, 54)], fill=255)  # beak
    d.polygon([(40, 64), (14, 50), (36, 80)], fill=255)  # tail
    d.polygon([(48, 62), (66, 24), (76, 64)], fill=255)  # raised wing
    d.line([(56, 86), (54, 106)], fill=255, width=4)  # legs
    d.line([(70, 86), (72, 106)], fill=255, width=4)


def _car(d: ImageDraw.ImageDraw) -> None:
    d.rounded_rectangle((14, 62, 114, 92), radius=8, fill=255)  # body
    d.polygon([(36, 62), (48, 38), (84, 38), (98, 62)], fill=255)  # cabin
    d.ellipse((26, 80, 50, 104), fill=0)  # wheel arches cut out, then wheels
    d.ellipse((78, 80, 102, 104), fill=0)
    d.ellipse((30, 84, 46, 100), fill=255)
    d.ellipse((82, 84, 98, 100), fill=255)


def _boat(d: ImageDraw.ImageDraw) -> None:
    d.polygon([(14, 80), (114, 80), (96, 104), (30, 104)], fill=255)  # hull
    d.rectangle((62, 16, 66, 80), fill=255)  # mast
    d.polygon([(68, 18), (68, 74), (104, 74)], fill=255)  # sail
    d.polygon([(60, 30), (60, 74), (34, 74)], fill=255)  # jib


def _cup(d: ImageDraw.ImageDraw) -> None:
    d.polygon([(30, 40), (86, 40), (80, 104), (36, 104)], fill=255)  # tapered cup
    d.ellipse((74, 52, 106, 88), fill=255)  # handle ring
    d.ellipse((82, 60, 98, 80), fill=0)
    d.rectangle((24, 104, 92, 112), fill=255)  # saucer


def _flower(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((61, 64, 67, 116), fill=255)  # stem
    d.ellipse((66, 84, 92, 96), fill=255)  # leaf
    for k in range(6):  # petals around the centre
        a = k * math.pi / 3
        cx, cy = 64 + 22 * math.cos(a), 42 + 22 * math.sin(a)
        d.ellipse((cx - 12, cy - 12, cx + 12, cy + 12), fill=255)
    d.ellipse((54, 32, 74, 52), fill=0)  # hollow centre


def _mushroom(d: ImageDraw.ImageDraw) -> None:
    d.pieslice((18, 24, 110, 104), 180, 360, fill=255)  # domed cap
    d.rectangle((50, 62, 78, 112), fill=255)  # thick stalk


_OBJECT_DRAWERS: dict[str, Drawer] = {
    "bear": _bear,
    "cat": _cat,
    "tower": _tower,
    "fish": _fish,
    "tree": _tree,
    "house": _house,
    "bird": _bird,
    "car": _car,
    "boat": _boat,
    "cup": _cup,
    "flower": _flower,
    "mushroom": _mushroom,
}
OBJECTS: list[str] = list(_OBJECT_DRAWERS)

# Every word a prompt uses; the shipped tokenizer makes each of them one token (held-out wordings included, so
# that their words are known tokens whose embeddings training never touched).
VOCABULARY: list[str] = sorted(
    {w for s in STYLES for w in s.split()}
    | set(OBJECTS)
    | {w for t in TRAINING_TEMPLATES + HELDOUT_TEMPLATES
       for w in t.replace("{object}", " ").replace("{style}", " ").replace(",", " ").replace("-", " ").split()}
    | {"image", "photo", "of", "the", "an", "picture", "painting", "drawing", "portrait", "city", "field", "style"}
)


def auxiliary_concepts(exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """A protected auxiliary concept set of the paper's kind, derived from the vocabulary (no download).

    Every style, every family word and every texture word on its own, a fixed quarter of the family x texture
    combinations that are not styles ("neon mosaic": words the model knows, in pairs it never saw), and every
    object.

    Args:
        exclude: concepts to leave out (the request's target); case and surrounding spaces do not matter.

    Returns:
        ``{"style": [...], "object": [...]}``.

    Examples:
        >>> concepts = auxiliary_concepts(exclude=["neon dots"])
        >>> "neon dots" in concepts["style"], concepts["object"] == list(OBJECTS)
        (False, True)
    """
    excluded = {c.strip().lower() for c in exclude}
    unseen = [f"{f} {t}" for f in FAMILY_PALETTES for t in TEXTURE_WORDS if f"{f} {t}" not in _STYLE_SPECS]
    styles = list(STYLES) + list(FAMILY_PALETTES) + list(TEXTURE_WORDS) + unseen[::4]
    return {"style": [c for c in styles if c not in excluded],
            "object": [c for c in OBJECTS if c not in excluded]}


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
    """Render one training image of MiniCanvas's synthetic world: ``obj`` drawn in ``style``.

    Identical for identical arguments, in any process (the random generator is seeded by a stable hash).

    Args:
        style: one of ``STYLES``.
        obj: one of ``OBJECTS``.
        seed: picks the image's variation (position, jitter, texture phase).
        size: the image's side in pixels, at least 8.

    Returns:
        A ``size`` x ``size`` RGB PIL image.

    Raises:
        ValueError: an unknown style or object, or a size below 8.

    Examples:
        >>> image = render("neon dots", "cat", seed=0)
        >>> image.size, image.tobytes() == render("neon dots", "cat", seed=0).tobytes()
        ((32, 32), True)
    """
    if style not in _STYLE_SPECS:
        raise ValueError(f"unknown style {style!r}; allowed: {STYLES}")
    if obj not in _OBJECT_DRAWERS:
        raise ValueError(f"unknown object {obj!r}; allowed: {OBJECTS}")
    check_int(size, "size", minimum=8)
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
