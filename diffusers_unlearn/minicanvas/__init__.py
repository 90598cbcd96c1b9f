"""MiniCanvas: a tiny, shipped Stable-Diffusion-architecture model of a synthetic style x object world.

The offline default model of diffusers-unlearn. A real ``StableDiffusionPipeline`` (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIPTextModel, an offline CLIP tokenizer, DDIM) trained by
``python -m diffusers_unlearn.minicanvas.train`` on ``minicanvas.data``, plus style and object
classifiers that judge its images, as UnlearnCanvas does for Stable Diffusion.

The example below is not run by the doctests (it loads the shipped model and samples with it, too slow for them);
docs/snippets/minicanvas.py runs the same kind of session in the tests.

Examples:
    >>> from diffusers_unlearn import minicanvas as mc
    >>> pipe = mc.load_pipeline()
    >>> style_clf, object_clf = mc.load_classifiers()
    >>> prompts = [mc.prompt("neon dots", "cat"), mc.prompt("neon dots", "cat", mc.HELDOUT_TEMPLATES[0])]
    >>> images = pipe(prompts, num_inference_steps=mc.NUM_INFERENCE_STEPS, guidance_scale=mc.GUIDANCE_SCALE).images
    >>> style_clf(images), object_clf(images)
    (['neon dots', 'neon dots'], ['cat', 'cat'])
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from .data import (
    HELDOUT_TEMPLATES,
    OBJECTS,
    PROMPT_TEMPLATE,
    STYLE_FAMILIES,
    STYLES,
    TRAINING_TEMPLATES,
    auxiliary_concepts,
    prompt,
    render,
)
from .settings import EVAL_SEEDS, GUIDANCE_SCALE, NUM_INFERENCE_STEPS, RESOLUTION

if TYPE_CHECKING:  # what type checkers see; at run time these load on first use (``__getattr__``)
    import torch
    from diffusers import StableDiffusionPipeline

    from .checkpoint import DEFAULT_WEIGHTS_DIR, MiniCanvasWeightsError, verify_weights
    from .classifier import ConceptClassifier
    from .evaluation import eval_world

# Names from the modules that import torch, loaded on first use (PEP 562), so that the world's vocabulary
# (``concepts``: a misspelled concept is refused on the command line before any work) imports no torch.
_LAZY = {"ConceptClassifier": "classifier", "DEFAULT_WEIGHTS_DIR": "checkpoint", "MiniCanvasWeightsError": "checkpoint",
         "verify_weights": "checkpoint", "eval_world": "evaluation"}

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "concepts",
    "EVAL_SEEDS",
    "GUIDANCE_SCALE",
    "HELDOUT_TEMPLATES",
    "NUM_INFERENCE_STEPS",
    "OBJECTS",
    "PROMPT_TEMPLATE",
    "RESOLUTION",
    "STYLES",
    "STYLE_FAMILIES",
    "TRAINING_TEMPLATES",
    "ConceptClassifier",
    "MiniCanvasWeightsError",
    "auxiliary_concepts",
    "eval_world",
    "load_classifiers",
    "load_pipeline",
    "prompt",
    "render",
    "verify_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_pipeline(device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                  weights_dir: str | os.PathLike | None = None) -> StableDiffusionPipeline:
    """The MiniCanvas ``StableDiffusionPipeline``, loaded offline after checking every file's sha256 against the
    shipped manifest (a tampered or truncated file is refused before it is read).

    The pipeline is marked as the ``minicanvas`` world's (``unlearn_world``): its requests may remove only
    ``STYLES`` and ``OBJECTS``.

    Args:
        device: where to put it; None leaves it on the CPU.
        torch_dtype: the dtype of its weights; None loads float32.
        weights_dir: a folder of MiniCanvas weights with its manifest; None: the shipped ``DEFAULT_WEIGHTS_DIR``.

    Returns:
        The diffusers pipeline (attach the unlearning behaviour with ``du.attach``).

    Raises:
        MiniCanvasWeightsError: a ``ValueError`` naming the file, when a weight file is missing, corrupted or does
            not fit the model.
    """
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = importlib.import_module(".checkpoint", __name__).load_pipeline_from(weights_dir, device=device, **dtype)
    pipe.unlearn_world = "minicanvas"
    return pipe


def concepts() -> dict[str, list[str]]:
    """MiniCanvas's vocabulary: what a request on it may remove (imports no torch, so the command line checks a
    concept's spelling before any work).

    Returns:
        ``{"style": STYLES, "object": OBJECTS}``, as new lists.
    """
    return {"style": list(STYLES), "object": list(OBJECTS)}


def load_classifiers(device: str | torch.device | None = None,
                     weights_dir: str | os.PathLike | None = None) -> tuple[ConceptClassifier, ConceptClassifier]:
    """The classifiers that judge MiniCanvas images (UA, IRA and CRA are measured with them), checked like
    ``load_pipeline``.

    Args:
        device: where to put them; None leaves them on the CPU.
        weights_dir: a folder of MiniCanvas weights with its manifest; None: the shipped ``DEFAULT_WEIGHTS_DIR``.

    Returns:
        ``(style_classifier, object_classifier)``; each maps PIL images or a ``[B, 3, H, W]`` tensor in [0, 1] to
        label names (``STYLES`` / ``OBJECTS``).

    Raises:
        MiniCanvasWeightsError: a classifier weight file is missing, corrupted or does not fit the model.
    """
    return importlib.import_module(".checkpoint", __name__).load_classifiers_from(weights_dir, device=device)
