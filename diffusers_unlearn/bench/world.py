"""A benchmark world: a model, its style x object concepts, classifiers that judge its images, removal orders.

The default world is MiniCanvas (shipped, offline). Any pipeline with a style/object prompt template and two
classifiers makes one (e.g. Stable Diffusion with CLIP zero-shot classifiers on a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import minicanvas as mc
from .._validation import check_int
from ..evaluation import Classifier, EvalConfig
from ..evaluation.metrics import check_eval_domain
from ..prompts import TEMPLATES, register_templates


@dataclass
class BenchWorld:
    """Everything a benchmark needs of a model family.

    Args:
        name: short name; the prompt domains of its requests are registered as ``"{name}-style"`` / ``"-object"``.
        eval_config: prompt template, concepts, seeds and sampling settings of the evaluation. Its styles and
            objects may be a subset of the world's (a cheaper evaluation); requests and gradient projection always
            use every concept.
        load_pipeline: returns a fresh pipeline of the base model (called once per protocol).
        style_classifier, object_classifier: ``images -> labels`` for each domain.
        orders: removal order per domain (default: the evaluated concepts, in order).
        styles, objects: every concept of the world (default: the evaluated ones).
    """

    name: str
    eval_config: EvalConfig
    load_pipeline: Callable[[], Any]
    style_classifier: Classifier
    object_classifier: Classifier
    orders: dict[str, list[str]] = field(default_factory=dict)
    styles: list[str] | None = None
    objects: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or " " in self.name:
            raise ValueError(f"world name must be a non-empty word, got {self.name!r}")
        self.styles = list(self.styles if self.styles is not None else self.eval_config.styles)
        self.objects = list(self.objects if self.objects is not None else self.eval_config.objects)
        for domain in ("style", "object"):
            evaluated = self.eval_config.concepts(domain)
            outside = [c for c in evaluated if c not in self.concepts(domain)]
            if outside:
                raise ValueError(f"evaluated {domain}s {outside} are not {domain}s of the world {self.name!r}")
            order = list(self.orders.get(domain, evaluated))
            if len(set(order)) != len(order) or any(c not in evaluated for c in order):
                raise ValueError(f"the {domain} removal order {order} must list distinct evaluated {domain}s "
                                 f"(of {evaluated}): a removed concept's UA needs its images")
            self.orders[domain] = order

    def concepts(self, domain: str) -> list[str]:
        """Every concept of the domain (not only the evaluated ones)."""
        return list(self.styles if check_eval_domain(domain) == "style" else self.objects)  # type: ignore[arg-type]

    def stream(self, domain: str, requests: int) -> list[str]:
        """The first ``requests`` concepts of the domain's removal order.

        A stream may remove every evaluated concept of the domain (MiniCanvas's ``--requests 12``); after the request
        that removes the last kept one, IRA and CRA are undefined (n/a) and UA is the only score.
        """
        order = self.orders[check_eval_domain(domain)]
        check_int(requests, "requests", minimum=1)
        if requests > len(order):
            raise ValueError(f"{self.name} has {len(order)} {domain}s to remove in its removal order; asked for a "
                             f"stream of {requests} requests: use at most {len(order)}")
        return order[:requests]

    def prompt_domain(self, domain: str) -> str:
        return f"{self.name}-{check_eval_domain(domain)}"

    def templates(self, domain: str) -> list[str]:
        """Request templates: the world's own prompt with the concept's slot open, across the other domain."""
        template = self.eval_config.template
        if check_eval_domain(domain) == "style":
            return [template.format(object=o, style="{}") for o in self.concepts("object")]
        return [template.format(object="{}", style=s) for s in self.concepts("style")]

    def register_domains(self) -> None:
        """Register the world's prompt domains, so requests and gradient projection embed concepts in its prompts."""
        for domain in ("style", "object"):
            name = self.prompt_domain(domain)
            templates = tuple(self.templates(domain))
            if TEMPLATES.get(name) != templates:
                register_templates(name, templates, replace=True)  # a world of the same name, other concepts

    def vocabulary(self) -> dict[str, list[str]]:
        """Gradient projection's neighbour pool: every concept of both domains, in the world's prompt domains."""
        return {self.prompt_domain(d): self.concepts(d) for d in ("style", "object")}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "styles": self.styles, "objects": self.objects, "eval": self.eval_config.to_dict(),
                "orders": self.orders}


def family_round_robin(families: dict[str, Sequence[str]]) -> list[str]:
    """One member of each family in turn: consecutive requests hit different families, and every removed style
    keeps a near neighbour (same family) among the kept ones for as long as possible."""
    queues = [list(members) for members in families.values()]
    order: list[str] = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def minicanvas_world(weights_dir: str | os.PathLike | None = None, eval_seeds: int | None = None,
                     eval_objects: Sequence[str] | None = None, eval_steps: int | None = None, batch_size: int = 32,
                     device: str | None = None) -> BenchWorld:
    """The shipped MiniCanvas model and classifiers; styles removed one per family in turn.

    ``eval_seeds`` (the first n ``EVAL_SEEDS``), ``eval_objects`` and ``eval_steps`` (sampling steps, also those of
    the requests' trajectories) make the evaluation a cheaper subset.
    """
    style_clf, object_clf = mc.load_classifiers(device=device, weights_dir=weights_dir)

    def load() -> Any:
        pipe = mc.load_pipeline(device=device, weights_dir=weights_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    overrides: dict[str, Any] = {"batch_size": batch_size}
    if eval_objects is not None:
        overrides["objects"] = list(eval_objects)
    if eval_steps is not None:
        overrides["num_inference_steps"] = eval_steps
    config = EvalConfig.minicanvas(seeds=eval_seeds, **overrides)
    object_order = [o for o in mc.OBJECTS if o in config.objects]
    return BenchWorld("minicanvas", config, load, style_clf, object_clf,
                      orders={"style": family_round_robin(mc.STYLE_FAMILIES), "object": object_order},
                      styles=list(mc.STYLES), objects=list(mc.OBJECTS))
