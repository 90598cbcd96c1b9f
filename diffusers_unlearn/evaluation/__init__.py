"""Evaluation of unlearned pipelines: UnlearnCanvas's UA / IRA / CRA with any classifier, K/V drift, cost.

Evaluation knows no world of its own: a world hands it an ``EvalWorld`` (concepts, prompts, classifiers).

>>> from diffusers_unlearn import evaluation as ev, minicanvas
>>> world = minicanvas.eval_world()
>>> config = world.eval_config(seeds=2)
>>> style_clf, object_clf = world.load_classifiers()
>>> scores = ev.evaluate_unlearning(pipe, pipe.removed_concepts, "style", style_clf, object_clf, config)
>>> scores.ua, scores.ira, scores.cra, ev.kv_drift(pipe)
"""

import warnings

from ..images import generate_images, to_pil
from .attacks import ATTACKS, AttackResult, attack, register_attack
from .classifiers import (
    DEFAULT_CLIP_TEMPLATES,
    Classifier,
    CLIPZeroShotClassifier,
    classify,
    minicanvas_classifiers,
)
from .metrics import (
    DOMAINS,
    UNLEARNCANVAS_SEEDS,
    UNLEARNCANVAS_TEMPLATE,
    EvalConfig,
    UnlearningScores,
    evaluate_unlearning,
    kv_drift,
    kv_drift_per_layer,
    request_costs,
    score_predictions,
)
from .distributed import evaluation_state, generate_and_classify, launched_processes
from .retention import EvalReference, FeatureExtractor, frechet_distance, relative_image_change, seed_gap
from .world import EvalWorld, eval_world_of, named_eval_world

__all__ = [
    "ATTACKS",
    "AttackResult",
    "attack",
    "register_attack",
    "DEFAULT_CLIP_TEMPLATES",
    "DOMAINS",
    "UNLEARNCANVAS_SEEDS",
    "UNLEARNCANVAS_TEMPLATE",
    "CLIPZeroShotClassifier",
    "Classifier",
    "EvalConfig",
    "EvalReference",
    "EvalWorld",
    "FeatureExtractor",
    "UnlearningScores",
    "classify",
    "evaluate_unlearning",
    "evaluation_state",
    "generate_and_classify",
    "launched_processes",
    "eval_world_of",
    "named_eval_world",
    "frechet_distance",
    "relative_image_change",
    "seed_gap",
    "generate_images",
    "kv_drift",
    "kv_drift_per_layer",
    "minicanvas_classifiers",
    "request_costs",
    "score_predictions",
    "to_pil",
]


def __getattr__(name: str):
    # former names, kept one release with a FutureWarning
    if name == "UnlearnCanvasScores":
        warnings.warn("UnlearnCanvasScores is deprecated and will be removed in version 0.3.0; use UnlearningScores "
                      "(the scores of any world, MiniCanvas's included)", FutureWarning, stacklevel=2)
        return UnlearningScores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
