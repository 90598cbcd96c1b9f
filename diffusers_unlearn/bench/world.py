"""A benchmark world: a model, its style x object concepts, classifiers that judge its images, removal orders.

The default world is MiniCanvas (shipped, offline). Any pipeline with a style/object prompt template and two
classifiers makes one (e.g. Stable Diffusion with CLIP zero-shot classifiers on a GPU).

A world splits its concepts in two: the evaluated ones (``eval_config``: the stream's removals and the kept concepts
IRA and CRA are scored on) and the rest, which is all a protocol may be told to keep (``auxiliary``) and all its
request prompts draw on. A method told to keep a concept keeps it, so retention is scored only on concepts no
protocol was given; a protocol handed an evaluated concept is refused (``check_protected``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import minicanvas as mc
from .._validation import check_count, check_int, check_seed
from ..engine.classifier_check import ClassifierCheck
from ..evaluation import Classifier, EvalConfig, EvalWorld
from ..evaluation.metrics import check_eval_domain
from ..evaluation.retention import FeatureExtractor
from ..evaluation.world import Renderer
from ..prompts import TEMPLATES, register_templates, same_concept

# fields of a method config or regularizer that name concepts to keep: what check_protected inspects
PROTECTION_FIELDS = ("vocabulary", "keep")


@dataclass
class BenchWorld:
    """Everything a benchmark needs of a model family.

    Args:
        name: short name; the prompt domains of its requests are registered as ``"{name}-style"`` / ``"-object"``.
        eval_config: prompt template, concepts, seeds and sampling settings of the evaluation. Its styles and
            objects may be a subset of the world's (a cheaper evaluation); requests and gradient projection always
            use every concept.
        load_pipeline: returns a fresh pipeline of the base model (called once per protocol).
        style_classifier: ``images -> labels`` for the styles.
        object_classifier: ``images -> labels`` for the objects.
        orders: removal order per domain (default: the evaluated concepts, in order).
        styles: every style of the world (default: the evaluated ones).
        objects: every object of the world (default: the evaluated ones).
        heldout_templates: prompt templates (``{style}`` and ``{object}`` slots) the model was not trained on; after
            every request the removed concepts are also scored in these wordings (``ua_heldout``), to tell erasing a
            concept from erasing one phrasing. Empty: no held-out score.
        heldout_others: how many evaluated concepts of the other domain the held-out images use (the first ones).
        auxiliary: the concepts a protocol may be told to keep (gradient projection's pool, the closed form's
            vocabulary, a retain loss), ``{"style": [...], "object": [...]}``; disjoint from every evaluated concept
            (default: every concept of the world that is not evaluated). The target and earlier removals are never
            taken from it.
        anchors: Concept Ablation's anchor per domain where the world has a better one than a generic word
            (``bench.DEFAULT_ANCHORS``), e.g. a concrete object when the model draws no object-less image.
        check_seeds: the seeds of a verified protocol's erasure check (``erasure_check``); never the evaluation's,
            so that a request is not tuned to the images it is scored on.
        check_templates: how many prompts of the request's templates the check draws (spread over them).
        feature_extractor: ``images -> [B, F]`` features for the Fréchet distance of kept images to the base's
            (None: no Fréchet distance).
        prompt_concepts: the concepts request prompts are written with, ``{"style": [...], "object": [...]}``
            (default: every concept outside the evaluation); evaluated ones among them are left out.
        render: ``render(style, object, seed, size) -> PIL image``, the world's real images (the fine-tune
            attack's training data, ``EvalWorld.render``); None: the attack trains on the pipeline's samples.
    """

    name: str
    eval_config: EvalConfig
    load_pipeline: Callable[[], Any]
    style_classifier: Classifier
    object_classifier: Classifier
    orders: dict[str, list[str]] = field(default_factory=dict)
    styles: list[str] | None = None
    objects: list[str] | None = None
    heldout_templates: list[str] = field(default_factory=list)
    heldout_others: int = 2
    auxiliary: dict[str, list[str]] | None = None
    anchors: dict[str, str] = field(default_factory=dict)
    check_seeds: tuple[int, ...] = (1,)
    check_templates: int = 12
    feature_extractor: FeatureExtractor | None = None
    prompt_concepts: dict[str, list[str]] | None = None
    render: Renderer | None = None

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
        for template in self.heldout_templates:
            if not isinstance(template, str) or "{style}" not in template or "{object}" not in template:
                raise ValueError(f"held-out template needs '{{style}}' and '{{object}}' slots, got {template!r}")
        check_count(self.heldout_others, "heldout_others")
        if self.auxiliary is not None:
            unknown = sorted(set(self.auxiliary) - {"style", "object"})
            if unknown:
                raise ValueError(f"auxiliary concept domains must be 'style' / 'object', got {unknown}")
            self.auxiliary = {d: list(self.auxiliary.get(d, [])) for d in ("style", "object")}
            self.check_protected([c for d in ("style", "object") for c in self.auxiliary[d]], "auxiliary")
        unknown = sorted(set(self.anchors) - {"style", "object"})
        if unknown:
            raise ValueError(f"anchor domains must be 'style' / 'object', got {unknown}")
        self.check_seeds = tuple(check_seed(s, "check_seeds") for s in self.check_seeds)
        shared = sorted(set(self.check_seeds) & set(self.eval_config.seeds))
        if not self.check_seeds or shared:
            raise ValueError(f"check_seeds must be a non-empty list of seeds the evaluation does not use (its seeds: "
                             f"{list(self.eval_config.seeds)}), got {list(self.check_seeds)}")
        check_int(self.check_templates, "check_templates", minimum=1)

    @property
    def eval_world(self) -> EvalWorld:
        """The world as evaluation and attacks see it: every style and object, the evaluation's template, seeds and
        sampling, the held-out wordings, the two classifiers and the renderer."""
        config = self.eval_config
        classifiers = (self.style_classifier, self.object_classifier)
        return EvalWorld(self.name, self.styles, self.objects, config.template,
                         heldout_templates=self.heldout_templates, seeds=config.seeds,
                         num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                         classifiers=lambda **_: classifiers, render=self.render)

    def concepts(self, domain: str) -> list[str]:
        """Every concept of the domain (not only the evaluated ones).

        Args:
            domain: "style" or "object".

        Returns:
            The concepts, in the world's order.

        Raises:
            ValueError: ``domain`` is neither "style" nor "object".
        """
        return list(self.styles if check_eval_domain(domain) == "style" else self.objects)  # type: ignore[arg-type]

    def evaluated(self) -> list[str]:
        """Every evaluated concept of both domains: the removals and the kept concepts retention is scored on."""
        return [*self.eval_config.styles, *self.eval_config.objects]

    def unevaluated(self, domain: str) -> list[str]:
        """The domain's concepts outside the evaluation: what protection and request prompts may use.

        Args:
            domain: "style" or "object".

        Returns:
            The concepts.
        """
        evaluated = self.evaluated()
        return [c for c in self.concepts(domain) if not any(same_concept(c, e) for e in evaluated)]

    def check_protected(self, concepts: Any, what: str) -> None:
        """Refuse ``concepts`` (names to keep, a list or ``{domain: [...]}``) that include an evaluated concept:
        a protocol told to keep a concept keeps it, and its retention would measure only that.

        Args:
            concepts: the names to keep, a list or ``{domain: [...]}``.
            what: what holds them, for the error message (e.g. "keep of closed_form").

        Raises:
            ValueError: an evaluated concept is among them.
        """
        names = [c for cs in concepts.values() for c in cs] if isinstance(concepts, dict) else list(concepts or [])
        evaluated = self.evaluated()
        overlap = sorted({str(c) for c in names if any(same_concept(str(c), e) for e in evaluated)})
        if overlap:
            raise ValueError(f"{what} of world {self.name!r} names evaluated concepts {overlap[:8]}"
                             f"{' ...' if len(overlap) > 8 else ''}: retention is scored on them, so no protocol may "
                             f"be told to keep them; keep only concepts outside the evaluation "
                             f"(e.g. {self.unevaluated('style')[:3] + self.unevaluated('object')[:2]})")

    def check_request(self, kwargs: dict[str, Any]) -> None:
        """Refuse a request (``pipe.unlearn`` keyword arguments) whose method or regularizers keep an evaluated
        concept (any of ``PROTECTION_FIELDS``).

        Args:
            kwargs: the request's ``pipe.unlearn`` keyword arguments.

        Raises:
            ValueError: the method or a regularizer keeps an evaluated concept.
        """
        for part in [kwargs.get("method"), *kwargs.get("regularizers", [])]:
            for name in PROTECTION_FIELDS:
                value = getattr(part, name, None)
                if value:
                    self.check_protected(value, f"the {getattr(part, 'method', None) or getattr(part, 'name', '')} "
                                                f"{name!r} of a request")

    def stream(self, domain: str, requests: int) -> list[str]:
        """The first ``requests`` concepts of the domain's removal order.

        A stream may remove every evaluated concept of the domain (MiniCanvas's ``--requests 12``); after the request
        that removes the last kept one, IRA and CRA are undefined (n/a) and UA is the only score.

        Args:
            domain: "style" or "object".
            requests: how many concepts to take.

        Returns:
            The concepts to remove, in order.
        """
        order = self.orders[check_eval_domain(domain)]
        check_int(requests, "requests", minimum=1)
        if requests > len(order):
            raise ValueError(f"{self.name} has {len(order)} {domain}s to remove in its removal order; asked for a "
                             f"stream of {requests} requests: use at most {len(order)}")
        return order[:requests]

    def prompt_domain(self, domain: str) -> str:
        """The prompt domain of the world's requests, ``"<world>-style"`` or ``"<world>-object"``.

        Args:
            domain: "style" or "object".

        Returns:
            The prompt domain.

        Raises:
            ValueError: ``domain`` is neither "style" nor "object".
        """
        return f"{self.name}-{check_eval_domain(domain)}"

    def prompt_others(self, domain: str) -> list[str]:
        """The other domain's concepts a ``domain`` request's prompts are written with: those outside the
        evaluation, so that no request trains on a scored concept's prompt; every one of them when the world has
        none outside it (a world as small as its evaluation; ``describe`` says so).

        Args:
            domain: "style" or "object".

        Returns:
            The concepts of the other domain.
        """
        other = "object" if check_eval_domain(domain) == "style" else "style"
        unevaluated = self.unevaluated(other)
        if self.prompt_concepts is not None:  # may name words outside the world's concepts (e.g. auxiliary ones)
            evaluated = self.evaluated()
            chosen = [c for c in self.prompt_concepts[other] if not any(same_concept(c, e) for e in evaluated)]
            return chosen or unevaluated or self.concepts(other)
        return unevaluated or self.concepts(other)

    def templates(self, domain: str) -> list[str]:
        """Request templates: the world's own prompt with the concept's slot open, across the other domain's
        concepts outside the evaluation (``prompt_others``).

        Args:
            domain: "style" or "object".

        Returns:
            The templates, each with one ``{}`` slot.
        """
        others = self.prompt_others(domain)
        if check_eval_domain(domain) == "style":
            return world_templates(self.eval_config.template, [], others, domain)
        return world_templates(self.eval_config.template, others, [], domain)

    def register_domains(self) -> None:
        """Register the world's prompt domains, so requests and gradient projection embed concepts in its prompts."""
        for domain in ("style", "object"):
            name = self.prompt_domain(domain)
            templates = tuple(self.templates(domain))
            if TEMPLATES.get(name) != templates:
                register_templates(name, templates, replace=True)  # a world of the same name, other concepts

    def erasure_check(self, domain: str) -> ClassifierCheck:
        """The check of a verified protocol's ``domain`` request: the domain's classifier on ``check_templates`` of
        the request's templates (spread over them) at ``check_seeds``, sampled as the evaluation samples.

        Args:
            domain: "style" or "object".

        Returns:
            The erasure check.
        """
        templates = self.templates(domain)
        step = max(1, len(templates) // self.check_templates)
        config = self.eval_config
        return ClassifierCheck(
            self.style_classifier if check_eval_domain(domain) == "style" else self.object_classifier,
            templates[::step][: self.check_templates], seeds=self.check_seeds,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            batch_size=config.batch_size, height=config.height, width=config.width)

    def vocabulary(self) -> dict[str, list[str]]:
        """What a protocol may keep, in the world's prompt domains: ``auxiliary``, or every concept of the world
        outside the evaluation."""
        pool = self.auxiliary if self.auxiliary is not None else {d: self.unevaluated(d) for d in ("style", "object")}
        return {self.prompt_domain(d): list(pool[d]) for d in ("style", "object")}

    def describe(self) -> dict[str, Any]:
        """The world's concepts, evaluation, orders and the split between protected and scored concepts.

        Returns:
            A JSON-ready dict for the bench report.
        """
        return {"name": self.name, "styles": self.styles, "objects": self.objects, "eval": self.eval_config.to_dict(),
                "orders": self.orders, "heldout_templates": list(self.heldout_templates),
                "heldout_others": self.heldout_others, "check_seeds": list(self.check_seeds),
                "check_templates": self.check_templates,
                "auxiliary_size": sum(len(c) for c in self.vocabulary().values()),
                # the honest protocol's split: what protocols may keep, and what retention is scored on (disjoint)
                "protected": {d: list(c) for d, c in self.vocabulary().items()},
                "scored": {"style": list(self.eval_config.styles), "object": list(self.eval_config.objects)},
                "request_prompt_others": {d: self.prompt_others(d) for d in ("style", "object")},
                "request_prompts_use_evaluated": any(any(same_concept(c, e) for c in self.prompt_others(d)
                                                         for e in self.evaluated()) for d in ("style", "object"))}


def world_templates(template: str, styles: Sequence[str], objects: Sequence[str], domain: str) -> list[str]:
    """A style x object world's request templates for ``domain``: ``template`` (``{style}`` and ``{object}``
    slots) with the domain's slot open, across every concept of the other domain."""
    if check_eval_domain(domain) == "style":
        return [template.format(object=o, style="{}") for o in objects]
    return [template.format(object="{}", style=s) for s in styles]


# The concepts MiniCanvas's request prompts are written with, in every world and every process: the styles that no
# default evaluation draws (each family's third and fourth members) and the objects outside the style evaluation's.
# Fixed, so that a request solved in the bench and re-solved after a rollback in a fresh process sees one template set.
MINICANVAS_PROMPT_STYLES = tuple(s for members in mc.STYLE_FAMILIES.values() for s in list(members)[2:])
# The bench's default evaluation objects for style requests: CRA over these; every removed style is drawn with each.
MINICANVAS_EVAL_OBJECTS = ("bear", "fish", "house", "flower")
MINICANVAS_PROMPT_OBJECTS = tuple(o for o in mc.OBJECTS if o not in MINICANVAS_EVAL_OBJECTS)


def register_minicanvas_domains() -> None:
    """Register MiniCanvas's prompt domains (``"minicanvas-style"``, ``"minicanvas-object"``) as
    ``minicanvas_world().register_domains()`` does, without loading its classifiers. The ``minicanvas`` world's
    domain provider (``diffusers_unlearn.worlds``): a fresh process that rolls back a MiniCanvas request needs them."""
    for domain in ("style", "object"):
        templates = tuple(world_templates(mc.PROMPT_TEMPLATE, MINICANVAS_PROMPT_STYLES, MINICANVAS_PROMPT_OBJECTS,
                                          domain))
        if TEMPLATES.get(f"minicanvas-{domain}") != templates:
            register_templates(f"minicanvas-{domain}", templates, replace=True)


def family_round_robin(families: dict[str, Sequence[str]]) -> list[str]:
    """One member of each family in turn: consecutive requests hit different families, and every removed style
    keeps a near neighbour (same family) among the kept ones for as long as possible.

    Args:
        families: family name -> its members, in order.

    Returns:
        The members, first of each family, then second of each, and so on.
    """
    queues = [list(members) for members in families.values()]
    order: list[str] = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def minicanvas_style_plan(families: int | None = None) -> tuple[list[str], list[str]]:
    """MiniCanvas's style stream and kept set: ``(removal order, kept styles)``.

    The paper's protocol: one style of each family in turn (request k removes the first member of family k), so
    consecutive requests hit different families; the kept set, on which IRA is scored, is the second member of
    each family, a near neighbour (same family word and palette) of a removed style, and shares texture words with
    removed styles of other families.

    Args:
        families: only the first n families (a cheaper evaluation); None: all of them.

    Returns:
        ``(removal order, kept styles)``.
    """
    groups = list(mc.STYLE_FAMILIES.values())
    if families is not None:
        check_int(families, f"families (MiniCanvas has {len(groups)} style families)", minimum=1,
                  maximum=len(groups))
        groups = groups[:families]
    return [g[0] for g in groups], [g[1] for g in groups]




def minicanvas_world(weights_dir: str | os.PathLike | None = None, eval_seeds: int | None = None,
                     eval_objects: Sequence[str] | None = None, eval_steps: int | None = None, batch_size: int = 32,
                     device: str | None = None, domain: str = "style", eval_families: int | None = None,
                     heldout: bool = True, order: Sequence[str] | None = None) -> BenchWorld:
    """The shipped MiniCanvas model and classifiers, with the evaluation set of the paper's kind.

    ``domain="style"``: styles are removed one family after another (:func:`minicanvas_style_plan`); the evaluated
    styles are the removal order plus a kept neighbour of each, drawn with ``MINICANVAS_EVAL_OBJECTS``.
    ``domain="object"``: every object is evaluated and removed in order, drawn in one style of each family.
    What protocols may keep (``auxiliary``) is ``minicanvas.auxiliary_concepts()`` less every evaluated concept, and
    request prompts use only unevaluated concepts of the other domain (the honest protocol, module docstring).
    Gradient projection's pool is ``minicanvas.auxiliary_concepts()``. Concept Ablation maps an object onto the last
    object the evaluation does not score (``mushroom`` by default, which a default-order stream keeps): the model
    draws no object-less image, and a generic word draws random objects, the removed one among them
    (docs/benchmarks/minicanvas.md, calibration).

    Args:
        weights_dir: where the MiniCanvas weights are (default: the shipped ones).
        eval_seeds: the first n ``EVAL_SEEDS`` (default 2); fewer make the evaluation cheaper.
        eval_objects: the objects the style evaluation draws (default ``MINICANVAS_EVAL_OBJECTS``).
        eval_steps: sampling steps of the evaluation, also those of the requests' trajectories.
        batch_size: images per pipeline call.
        device: where the model and classifiers run (default: CPU).
        domain: "style" or "object", the domain the stream removes.
        eval_families: style plan of the first n families only.
        heldout: also score the removed concepts in the held-out wordings (``BenchWorld.heldout_templates``).
        order: the removal order of ``domain`` instead of the default (evaluated concepts; the stream is its
            first ``requests``), e.g. to check that a recipe does not depend on the default order.

    Returns:
        The bench world.

    Raises:
        ValueError: ``domain`` is neither "style" nor "object", or ``order`` is empty or not evaluated concepts.
    """
    check_eval_domain(domain)
    style_clf, object_clf = mc.load_classifiers(device=device, weights_dir=weights_dir)

    def load() -> Any:
        pipe = mc.load_pipeline(device=device, weights_dir=weights_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    overrides: dict[str, Any] = {"batch_size": batch_size}
    if eval_steps is not None:
        overrides["num_inference_steps"] = eval_steps
    removal, kept = minicanvas_style_plan(eval_families)
    if domain == "style":
        overrides["styles"] = removal + kept
        overrides["objects"] = list(eval_objects) if eval_objects is not None else list(MINICANVAS_EVAL_OBJECTS)
        orders = {"style": removal + kept, "object": list(overrides["objects"])}
    else:
        overrides["styles"] = removal
        overrides["objects"] = list(eval_objects) if eval_objects is not None else list(mc.OBJECTS)
        orders = {"style": removal, "object": list(overrides["objects"])}
    if order is not None:
        if isinstance(order, str) or not order:
            raise ValueError(f"order must be a non-empty list of {domain}s, got {order!r}")
        orders[domain] = list(order)  # BenchWorld refuses one that is not distinct evaluated concepts
    config = mc.eval_world().eval_config(seeds=2 if eval_seeds is None else eval_seeds, **overrides)
    evaluated = [*config.styles, *config.objects]
    auxiliary = {d: [c for c in concepts if c not in evaluated] for d, concepts in mc.auxiliary_concepts().items()}
    # Concept Ablation's object anchor: an object the evaluation does not score, the last one when it can
    anchor = next((o for o in reversed(mc.OBJECTS) if o not in config.objects), mc.OBJECTS[-1])
    return BenchWorld("minicanvas", config, load, style_clf, object_clf, orders=orders,
                      styles=list(mc.STYLES), objects=list(mc.OBJECTS),
                      heldout_templates=list(mc.HELDOUT_TEMPLATES) if heldout else [],
                      auxiliary=auxiliary, anchors={"object": anchor},
                      feature_extractor=minicanvas_features(style_clf, object_clf),
                      prompt_concepts={"style": list(MINICANVAS_PROMPT_STYLES),
                                       "object": list(MINICANVAS_PROMPT_OBJECTS)},
                      render=mc.render)


def minicanvas_features(style_classifier: Any, object_classifier: Any) -> FeatureExtractor:
    """MiniCanvas's image features for the Fréchet distance: both classifiers' pooled features side by side."""

    def features(images: Any) -> torch.Tensor:
        return torch.cat([style_classifier.embed(images), object_classifier.embed(images)], dim=1)

    return features
