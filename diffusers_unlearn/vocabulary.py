"""Built-in concept vocabulary: common styles and objects that gradient projection draws neighbours from.

The style list follows UnlearnCanvas's style names and common art movements; the object list follows its object
classes and everyday subjects. Replace it per call (``GradientProjection(vocabulary=...)``) for another domain.
"""

from __future__ import annotations

DEFAULT_VOCABULARY: dict[str, tuple[str, ...]] = {
    "style": (
        "abstractionism", "byzantine", "cartoon", "cold warm", "ukiyoe", "van gogh", "neon lines", "picasso",
        "on fire", "magic cube", "winter", "vibrant flow", "expressionism", "impressionism", "blossom season",
        "monet", "cubism", "pop art", "watercolor", "sketch", "pixel art", "oil painting", "renaissance",
        "baroque", "surrealism", "minimalism", "art nouveau", "pointillism", "gothic", "anime", "comic",
        "charcoal", "mosaic", "stained glass", "graffiti", "rembrandt", "dali", "klimt", "hokusai", "warhol",
    ),
    "object": (
        "bear", "bird", "cat", "dog", "fish", "frog", "jellyfish", "rabbit", "sandwich", "statue", "tower",
        "waterfall", "horse", "car", "tree", "flower", "house", "bridge", "boat", "mountain", "castle",
        "apple", "chair", "clock", "lion", "tiger", "elephant", "airplane", "guitar", "church",
    ),
}
