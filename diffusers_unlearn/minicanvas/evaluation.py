"""MiniCanvas as evaluation and attacks see it: an ``evaluation.EvalWorld`` built from the world's own side, so that
nothing under ``evaluation/`` knows MiniCanvas (and the package root stays torch-free for the vocabulary check)."""

from __future__ import annotations

from ..evaluation.world import EvalWorld
from .data import HELDOUT_TEMPLATES, OBJECTS, PROMPT_TEMPLATE, STYLES, render
from .settings import EVAL_SEEDS, GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from .checkpoint import load_classifiers_from


def eval_world() -> EvalWorld:
    """MiniCanvas as evaluation and attacks see it (``du.evaluation.EvalWorld``): every style and object, its prompt
    and held-out wordings, its evaluation seeds and recommended sampling, its classifiers (``load_classifiers``,
    which takes ``device`` and ``weights_dir``) and its renderer (the fine-tune attack's real training images).

    Returns:
        The ``EvalWorld`` named ``"minicanvas"`` (the ``minicanvas`` world's evaluation, ``du.World.evaluation``).
    """
    return EvalWorld("minicanvas", STYLES, OBJECTS, PROMPT_TEMPLATE, heldout_templates=HELDOUT_TEMPLATES,
                     seeds=EVAL_SEEDS, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                     classifiers=load_classifiers_from, render=render)

