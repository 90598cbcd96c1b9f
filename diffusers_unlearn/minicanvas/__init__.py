"""MiniCanvas: a tiny, shipped Stable-Diffusion-architecture model of a synthetic style x object world.

The offline default model of diffusers-unlearn. A real ``StableDiffusionPipeline`` (UNet2DConditionModel with
cross-attention, AutoencoderKL, CLIPTextModel, an offline CLIP tokenizer, DDIM) trained by
``python -m diffusers_unlearn.minicanvas.train`` on :mod:`~diffusers_unlearn.minicanvas.data`, plus style and object
classifiers that judge its images, as UnlearnCanvas does for Stable Diffusion.

>>> from diffusers_unlearn import minicanvas as mc
>>> pipe = mc.load_pipeline()
>>> style_clf, object_clf = mc.load_classifiers()
>>> images = pipe([mc.prompt("neon dots", "cat"), mc.prompt("neon dots", "cat", mc.HELDOUT_TEMPLATES[0])], num_inference_steps=mc.NUM_INFERENCE_STEPS,
...               guidance_scale=mc.GUIDANCE_SCALE).images
>>> style_clf(images), object_clf(images)
"""

from __future__ import annotations

import os

import torch

from ..evaluation.world import EvalWorld
from .classifier import ConceptClassifier
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
from .weights import (
    DEFAULT_WEIGHTS_DIR,
    MiniCanvasWeightsError,
    load_classifiers_from,
    load_pipeline_from,
    verify_weights,
)

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "concepts",
    "eval_world",
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
    "load_classifiers",
    "load_pipeline",
    "prompt",
    "render",
    "verify_weights",
]


def load_pipeline(device: str | torch.device | None = None, torch_dtype: torch.dtype = torch.float32,
                  weights_dir: str | os.PathLike | None = None):
    """The MiniCanvas ``StableDiffusionPipeline``, loaded offline after checking every file's sha256.

    Raises :class:`MiniCanvasWeightsError` (a ``ValueError``) naming the file when a weight file is missing,
    corrupted or does not fit the model. ``device=None`` leaves it on the CPU. The pipeline is marked as the
    ``minicanvas`` world's (``unlearn_world``): its requests may remove only ``STYLES`` and ``OBJECTS``.
    """
    pipe = load_pipeline_from(weights_dir, device=device, torch_dtype=torch_dtype)
    pipe.unlearn_world = "minicanvas"
    return pipe


def concepts() -> dict[str, list[str]]:
    """MiniCanvas's vocabulary, ``{"style": STYLES, "object": OBJECTS}``: what a request on it may remove."""
    return {"style": list(STYLES), "object": list(OBJECTS)}


def load_classifiers(device: str | torch.device | None = None,
                     weights_dir: str | os.PathLike | None = None) -> tuple[ConceptClassifier, ConceptClassifier]:
    """``(style_classifier, object_classifier)``; each maps PIL images or a ``[B, 3, H, W]`` tensor in [0, 1] to
    label names (``STYLES`` / ``OBJECTS``). Checks the weights like :func:`load_pipeline`."""
    return load_classifiers_from(weights_dir, device=device)


def eval_world() -> EvalWorld:
    """MiniCanvas as evaluation and attacks see it (``du.evaluation.EvalWorld``): every style and object, its prompt
    and held-out wordings, its evaluation seeds and recommended sampling, its classifiers (``load_classifiers``,
    which takes ``device`` and ``weights_dir``) and its renderer (the fine-tune attack's real training images).

    Returns:
        The ``EvalWorld`` named ``"minicanvas"`` (the ``minicanvas`` world's evaluation, ``du.World.evaluation``).
    """
    return EvalWorld("minicanvas", STYLES, OBJECTS, PROMPT_TEMPLATE, heldout_templates=HELDOUT_TEMPLATES,
                     seeds=EVAL_SEEDS, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                     classifiers=load_classifiers, render=render)
