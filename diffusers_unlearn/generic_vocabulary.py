"""A broad generic protection set shipped with the package: thousands of concepts and prompts from a small grammar.

A request that must keep "everything else" on a model whose concepts it cannot know (a user's checkpoint) can
protect this set instead of a few dozen names: common subjects, art styles, media, colours and palettes, and surface
textures and patterns, alone and combined (``generic_vocabulary``), and whole prompts that put them together
(``generic_prompts``). Nothing is downloaded; the set is the same on every machine.

How it was made: the five word lists below were written by hand from general knowledge of art history (movements,
periods, genres and looks), artists' media and printmaking techniques, colour names and palettes, textures and
patterns of surfaces and fabrics, and everyday subjects (animals, plants, food, objects, vehicles, buildings,
landscapes, people). They were not drawn from any model's or benchmark's concept list (their author had read a few
style names of the MiniCanvas test model in issue texts, not its word lists; docs/benchmarks/retention.md measures
the overlap). The single colours and textures joined the style concepts after the first measurements. The grammar
is fixed:

- style concepts (the "style" domain's ``{}`` slot, e.g. "an image in {} style"): each art style, medium, colour
  and texture alone, each "<colour> <texture>" and each "<colour> <medium>" (the single words keep what a phrase
  is made of: protecting "teal stripes" alone need not keep "teal" in another phrase);
- object concepts (the "object" domain's slot, e.g. "a photo of a {}"): each subject and each "<colour> <subject>";
- prompts: "a <subject> in <art style> style", "a <medium> of a <subject>", "a <subject> with <colour> <texture>".

Rules are interleaved item by item and each "<a> <b>" rule runs in rounds that use every word of the shorter list,
so a prefix (``limit=``) mixes every rule and every word rather than one colour's combinations. The order is fixed
by the lists (no randomness).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import zip_longest

from ._validation import check_int

# Everyday subjects: animals, plants, food, objects, vehicles, buildings, places and people.
SUBJECTS: tuple[str, ...] = (
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "chicken", "duck", "goose", "owl", "eagle", "parrot",
    "penguin", "swan", "crow", "sparrow", "hummingbird", "flamingo", "peacock", "fox", "wolf", "deer", "moose",
    "bear", "lion", "tiger", "leopard", "cheetah", "zebra", "giraffe", "elephant", "rhinoceros", "hippo", "monkey",
    "gorilla", "panda", "koala", "kangaroo", "rabbit", "squirrel", "mouse", "hedgehog", "bat", "turtle", "frog",
    "snake", "lizard", "crocodile", "dolphin", "whale", "shark", "octopus", "crab", "lobster", "jellyfish",
    "starfish", "seahorse", "goldfish", "butterfly", "bee", "ladybug", "dragonfly", "spider", "snail", "camel",
    "rose", "sunflower", "tulip", "lily", "daisy", "orchid", "cactus", "fern", "mushroom", "oak tree", "palm tree",
    "pine tree", "bonsai", "apple", "banana", "cherry", "lemon", "pear", "strawberry", "watermelon", "pineapple",
    "grapes", "carrot", "pumpkin", "bread", "cake", "pizza", "burger", "sushi", "cupcake", "donut", "teapot",
    "coffee cup", "wine glass", "bottle", "vase", "lamp", "candle", "clock", "chair", "sofa", "bed", "table",
    "bookshelf", "book", "guitar", "piano", "violin", "drum", "trumpet", "camera", "telephone", "computer",
    "umbrella", "hat", "shoe", "backpack", "key", "bicycle", "motorcycle", "car", "bus", "truck", "train",
    "tram", "airplane", "helicopter", "rocket", "sailboat", "ship", "submarine", "tractor", "house", "cottage",
    "castle", "palace", "temple", "church", "cathedral", "mosque", "pagoda", "lighthouse", "windmill", "barn",
    "skyscraper", "bridge", "tower", "fountain", "statue", "robot", "mountain", "volcano", "waterfall", "river",
    "lake", "beach", "island", "desert", "forest", "jungle", "meadow", "canyon", "glacier", "cave", "garden",
    "village", "harbor", "market", "street", "city skyline", "moon", "planet", "galaxy", "rainbow", "child",
    "woman", "man", "old man", "girl", "boy", "knight", "astronaut", "dancer", "musician", "farmer", "chef",
    "sailor", "wizard", "dragon", "unicorn", "mermaid",
)

# Art movements, periods, genres and looks.
ART_STYLES: tuple[str, ...] = (
    "impressionism", "post impressionism", "expressionism", "abstract expressionism", "cubism", "surrealism",
    "dadaism", "fauvism", "futurism", "constructivism", "suprematism", "minimalism", "maximalism", "realism",
    "photorealism", "hyperrealism", "romanticism", "neoclassicism", "baroque", "rococo", "renaissance", "gothic",
    "byzantine", "art nouveau", "art deco", "bauhaus", "pop art", "op art", "pointillism", "symbolism",
    "primitivism", "folk art", "naive art", "street art", "ukiyo e", "sumi e", "persian miniature",
    "celtic knotwork", "islamic geometric", "medieval manuscript", "egyptian relief", "greek vase", "aztec",
    "anime", "manga", "cartoon", "comic book", "storybook", "concept art", "fantasy art", "science fiction",
    "cyberpunk", "steampunk", "solarpunk", "vaporwave", "synthwave", "retro futurism", "low poly", "isometric",
    "flat design", "line art", "cel shading", "film noir", "psychedelic", "kawaii", "chibi", "grunge",
    "vintage poster", "propaganda poster", "botanical illustration", "scientific illustration", "technical drawing",
    "architectural sketch", "fashion illustration", "tattoo flash", "voxel art", "stop motion", "silhouette",
    "chiaroscuro", "impasto", "sfumato", "tenebrism", "trompe l oeil", "brutalism", "memphis design",
    "mid century modern", "victorian", "rustic", "bohemian", "gothic horror", "fairy tale", "whimsical",
    "dreamlike", "cinematic", "documentary", "editorial", "abstract",
)

# Artists' media, printmaking and photographic processes, and crafts.
MEDIA: tuple[str, ...] = (
    "watercolor", "gouache", "acrylic", "oil paint", "chalk pastel", "oil pastel", "charcoal", "graphite",
    "pencil", "colored pencil", "ink", "ink wash", "crayon", "marker", "chalk", "fresco", "tempera", "encaustic",
    "etching", "engraving", "woodcut", "linocut", "lithograph", "screen print", "risograph", "collage",
    "paper cut", "origami", "stained glass", "embroidery", "tapestry", "quilt", "ceramic", "porcelain", "clay",
    "claymation", "bronze", "wood carving", "photograph", "polaroid", "film photo", "daguerreotype", "cyanotype",
    "pixel art", "vector art", "3d render", "digital painting", "airbrush", "spray paint", "graffiti", "blueprint",
    "sketch", "pen and ink", "mural", "needlepoint", "batik", "enamel", "papier mache",
)

# Colour names and palettes.
COLOURS: tuple[str, ...] = (
    "red", "crimson", "scarlet", "maroon", "orange", "amber", "golden", "yellow", "olive", "lime", "green",
    "emerald", "jade", "teal", "turquoise", "cyan", "aqua", "blue", "navy", "cobalt", "indigo", "violet",
    "purple", "lavender", "magenta", "pink", "peach", "coral", "brown", "tan", "beige", "ivory", "white",
    "silver", "grey", "slate", "black", "sepia", "pastel", "neon", "monochrome", "muted", "vivid", "earthy",
    "metallic", "iridescent", "duotone", "fluorescent", "candy", "autumn", "sunset", "ocean", "forest green",
    "sandy", "icy", "warm", "cool", "faded",
)

# Textures and patterns of surfaces, fabrics and marks.
TEXTURES: tuple[str, ...] = (
    "brushstrokes", "stripes", "dots", "polka dots", "checks", "checkerboard", "grid", "zigzag", "chevrons",
    "spirals", "swirls", "waves", "ripples", "lines", "crosshatching", "stippling", "speckles", "splatter", "drips",
    "smudges", "scribbles", "doodles", "tiles", "hexagons", "triangles", "circles", "squares", "diamonds",
    "paisley", "plaid", "tartan", "houndstooth", "herringbone", "lace", "marble", "wood grain", "grain",
    "glitter", "sparkles", "bubbles", "crackle", "rust", "fur", "feathers", "scales", "confetti", "fractals",
    "gradients", "halftone", "pixels", "scanlines", "glitch", "bokeh", "haze", "velvet", "denim", "knit",
    "mosaic", "terrazzo", "camouflage", "leopard print", "florals", "vines", "clouds", "flames", "stars",
)

WORD_LISTS: dict[str, tuple[str, ...]] = {
    "subject": SUBJECTS, "art style": ART_STYLES, "medium": MEDIA, "colour": COLOURS, "texture": TEXTURES,
}
"""The grammar's word lists by kind (each word a concept, no word in two lists)."""


def _interleave(*rules: Iterable[str]) -> list[str]:
    """The rules' items taken one from each in turn (a prefix mixes every rule), first occurrence kept."""
    merged = (item for group in zip_longest(*rules) for item in group if item is not None)
    return list(dict.fromkeys(merged))


def _pairs(first: Sequence[str], second: Sequence[str]) -> list[tuple[str, str]]:
    """Every (a, b) of ``first`` x ``second`` once, in rounds: round r pairs each word of the shorter list with the
    word r places further on in the longer one (wrapping), so that any prefix of one round or more uses every word
    of the shorter list and about as many of the longer."""
    if len(first) <= len(second):
        return [(first[i], second[(i + r) % len(second)]) for r in range(len(second)) for i in range(len(first))]
    return [(first[(j + r) % len(first)], second[j]) for r in range(len(first)) for j in range(len(second))]


def _joined(pairs: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{a} {b}" for a, b in pairs]


def _rotations(subjects: Sequence[str], partners: Sequence[str], rounds: int) -> list[tuple[str, str]]:
    """``rounds`` partners for each subject: subject i meets partner (i + r * stride) in round r, with a stride that
    spreads the rounds over the partner list; every partner is used about equally."""
    stride = max(1, len(partners) // rounds)
    return [(s, partners[(i + r * stride) % len(partners)]) for r in range(rounds) for i, s in enumerate(subjects)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


PROMPT_ROUNDS = 4  # partners per subject in each prompt rule


@lru_cache(maxsize=None)
def _build() -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    style = _interleave(ART_STYLES, MEDIA, COLOURS, TEXTURES, _joined(_pairs(COLOURS, TEXTURES)),
                        _joined(_pairs(COLOURS, MEDIA)))
    subject = _interleave(SUBJECTS, _joined(_pairs(COLOURS, SUBJECTS)))
    patterns = _joined(_pairs(COLOURS, TEXTURES))
    prompts = _interleave(
        (f"{_article(s)} {s} in {a} style" for s, a in _rotations(SUBJECTS, ART_STYLES, PROMPT_ROUNDS)),
        (f"{_article(m)} {m} of {_article(s)} {s}" for s, m in _rotations(SUBJECTS, MEDIA, PROMPT_ROUNDS)),
        (f"{_article(s)} {s} with {p}" for s, p in _rotations(SUBJECTS, patterns, PROMPT_ROUNDS)),
    )
    return {"style": tuple(style), "object": tuple(subject)}, tuple(prompts)


def _limited(items: tuple[str, ...], limit: int | None, name: str) -> tuple[str, ...]:
    if limit is None:
        return items
    return items[: check_int(limit, name, minimum=0)]


def generic_vocabulary(limit: int | None = None) -> dict[str, tuple[str, ...]]:
    """The generic concepts by domain, ``{"style": (...), "object": (...)}``, in the form the closed form's
    ``vocabulary=`` and ``GradientProjection(vocabulary=...)`` take.

    Args:
        limit: keep the first ``limit`` concepts of each domain (None: all of them). Prefixes mix every grammar
            rule and every word list, so a smaller set stays broad.

    Returns:
        A new dict of tuples; the same on every call.

    Raises:
        ValueError: ``limit`` is not an integer >= 0.
    """
    vocabulary, _ = _build()
    return {domain: _limited(concepts, limit, "limit") for domain, concepts in vocabulary.items()}


def generic_prompts(limit: int | None = None) -> tuple[str, ...]:
    """Whole prompts that combine the word lists ("a fox in art deco style", "a woodcut of a lighthouse", "a vase
    with teal stripes"), for protection in the "concept" domain (whose first template is the prompt itself).

    Args:
        limit: keep the first ``limit`` prompts (None: all). Prefixes mix the three prompt rules.

    Returns:
        The prompts, a tuple; the same on every call.

    Raises:
        ValueError: ``limit`` is not an integer >= 0.
    """
    _, prompts = _build()
    return _limited(prompts, limit, "limit")


def phrases() -> tuple[str, ...]:
    """Every phrase of the set: each word of the lists, each concept and each prompt, first occurrence kept.

    Returns:
        The phrases, a tuple, for checks such as which of a model's concepts the set names.
    """
    vocabulary, prompts = _build()
    words = [w for words in WORD_LISTS.values() for w in words]
    return tuple(dict.fromkeys([*words, *vocabulary["style"], *vocabulary["object"], *prompts]))


__all__ = ["WORD_LISTS", "generic_prompts", "generic_vocabulary", "phrases"]
