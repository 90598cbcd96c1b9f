"""Unlearning accuracy in wordings the model was never trained on: is the concept erased, or one phrasing of it?"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..evaluation.distributed import generate_and_classify
from ..evaluation.metrics import check_eval_domain
from .world import BenchWorld


def heldout_cases(world: BenchWorld, removed: Sequence[str], domain: str) -> list[tuple[str, str, str, int]]:
    """``(style, object, template, seed)`` of every held-out image: each removed concept in each held-out template,
    with the first ``world.heldout_others`` evaluated concepts of the other domain, at the first evaluation seed.

    Args:
        world: the bench world (its held-out templates and evaluation).
        removed: the concepts removed so far.
        domain: their domain, "style" or "object".

    Returns:
        One tuple per held-out image.
    """
    domain = check_eval_domain(domain)
    config = world.eval_config
    seed = config.seeds[0]
    others = config.concepts("object" if domain == "style" else "style")[: world.heldout_others]
    cases = []
    for concept in removed:
        for template in world.heldout_templates:
            for other in others:
                style, obj = (concept, other) if domain == "style" else (other, concept)
                cases.append((style, obj, template, seed))
    return cases


def heldout_unlearning(pipe: Any, world: BenchWorld, removed: Sequence[str], domain: str,
                       progress: bool = False) -> dict[str, Any] | None:
    """UA of the removed concepts in the held-out wordings: ``{"ua", "accuracy" (per concept), "num_images",
    "images_per_concept", "seconds"}``; None without held-out templates or removed concepts. Tells erasing a
    concept from erasing only the request's wordings of it.

    Args:
        pipe: the pipeline after the requests.
        world: the bench world (its held-out templates, evaluation sampling and classifiers).
        removed: the concepts removed so far.
        domain: their domain, "style" or "object".
        progress: show a progress bar while generating.

    Returns:
        The held-out scores, or None.
    """
    if not world.heldout_templates or not removed:
        return None
    domain = check_eval_domain(domain)
    started = time.perf_counter()
    cases = heldout_cases(world, removed, domain)
    config = world.eval_config
    classifier = world.style_classifier if domain == "style" else world.object_classifier
    # shared out over the launched processes, as the evaluation's own images are
    _, (predictions,) = generate_and_classify(
        pipe, [t.format(style=s, object=o) for s, o, t, _ in cases], [c[3] for c in cases], [classifier],
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
        batch_size=config.batch_size, height=config.height, width=config.width, progress=progress,
        desc="held-out wordings")
    axis = 0 if domain == "style" else 1
    accuracy = {}
    for concept in dict.fromkeys(removed):
        hits = [p == concept for p, c in zip(predictions, cases) if c[axis] == concept]
        accuracy[concept] = 100.0 * sum(hits) / len(hits)
    return {
        "ua": 100.0 - sum(accuracy.values()) / len(accuracy),
        "accuracy": accuracy,
        "num_images": len(cases),
        "images_per_concept": len(cases) // len(accuracy),
        "seconds": round(time.perf_counter() - started, 3),
    }
