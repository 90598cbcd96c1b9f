"""``UnlearnRequest``: one removal request, described and validated in one place, and ``resolve_request``, the one
function that turns a caller's options into one.

``pipe.unlearn(...)``, plan files and the command line all call ``resolve_request``, so a request gets the same
defaults (``engine/defaults.py``) and is checked the same way wherever it comes from, before anything touches the model;
the trainer takes it whole. A request knows the prompts it trains on, the fields its ledger record gets and its
signature (what a resumed plan compares with the ledger).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .._deprecation import rename_options
from .._validation import check_seed
from .defaults import RECOMMENDED_METHOD, TRAINED_METHOD, asks_for_training, default_method, recommended_options
from .ledger import RequestRecord, check_request_concepts, concepts_label
from ..kv.merging import MergeStrategy, resolve_strategy, strategy_to_dict
from ..objectives import (OBJECTIVES, ObjectiveConfig, TrainedObjective, TrainedObjectiveConfig,
                          build_objective_config, objective_class)
from ..prompts import TEMPLATES, check_concept, check_domain, same_concept, validate_templates
from ..regularizers import GradientProjection, Regularizer, check_regularizers
from .training_config import TrainingConfig
from ..vocabulary import DEFAULT_VOCABULARY

if TYPE_CHECKING:
    from ..families.registry import ModelFamily
    from ..worlds import WorldRecipe

RECIPE_KEYS = ("method", "domain", "steps", "learning_rate", "rank", "batch_size", "regularizers", "strategy")
"""What a world's recipe may set (``WorldRecipe.unlearn_kwargs``): each is overridden by the caller's own value."""


@dataclass
class UnlearnRequest:
    """One removal request, validated on construction.

    Args:
        concept: what to remove, e.g. "van gogh", or a list of distinct concepts removed together by this one
            request (``["van gogh", "monet"]``: one ledger entry, one solve or one training run). A list of one is
            that one concept.
        method: a registered method name ("esd", "ca", ...) or a ready method config (``du.CAConfig(...)``); a
            name becomes its config with default options (``resolve_request`` passes options and picks the
            recommended method when none is named).
        domain: "style", "object", "concept" (default) or a registered domain: picks the prompt templates.
        training: steps, learning rate, rank, batch size, mixed precision...
        seed: makes the request reproducible (adapter init, trajectories, minibatches).
        regularizers: e.g. ``[du.GradientProjection(keep=["monet"])]``; kept sorted by their ``order``.
        strategy: "sequential" (default) or a merge strategy (name or ``du.MergeStrategy``).
        prompts: explicit prompts instead of the domain's templates filled with the concept.
        templates: templates to fill instead of the domain's (ignored when ``prompts`` is given).
        concepts: leave it out: it is set from ``concept`` (given, it must be what ``concept`` gives).

    After construction ``concept`` is a string (for several concepts their label, joined by ", "), ``concepts`` the
    tuple of every concept, ``method`` an ``ObjectiveConfig``, ``domain`` a known domain, ``strategy`` resolved,
    ``prompts`` the list the request trains on and ``templates`` the templates behind them (None for explicit
    prompts). Several concepts fill each template with each concept in turn (template by template, so that the
    prompts go round the concepts); explicit prompts must name every concept. A trained method then samples at
    least one trajectory per concept: its ``num_trajectories`` is raised to the next multiple of the number of
    concepts, so that every concept has as many trajectories and each training step draws among them (seeded).
    Build one with ``resolve_request`` (or ``pipe.unlearn``) to get the library's defaults; this class applies none
    of them (a bare request is the trained method, ``esd``).

    Raises:
        ValueError, TypeError: a field that is not allowed (an empty concept, an unknown domain or method, a
            ``training`` that is not a ``TrainingConfig``, a regularizer the method refuses, empty prompts...),
            named with what is allowed.

    Examples:
        >>> request = UnlearnRequest("Van Gogh", "esd", domain="style")
        >>> request.method.method, request.strategy, request.prompts[0]
        ('esd', 'sequential', 'an image in Van Gogh style')
        >>> UnlearnRequest("cat", prompts=[])
        Traceback (most recent call last):
        ValueError: prompts must be a non-empty list of non-empty strings, got []
    """

    concept: str | Sequence[str]
    method: ObjectiveConfig | str = TRAINED_METHOD
    domain: str | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seed: int = 0
    regularizers: Sequence[Regularizer] | Regularizer | None = ()
    strategy: str | MergeStrategy | None = None
    prompts: Sequence[str] | None = None
    templates: Sequence[str] | None = None
    concepts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        concepts = check_request_concepts(self.concept)
        if self.concepts is not None and tuple(self.concepts) != concepts:  # ``dataclasses.replace`` passes both
            listed = check_request_concepts(self.concepts, "concepts")
            if not (isinstance(self.concept, str) and self.concept.strip() == concepts_label(listed)):
                raise ValueError(f"concepts {self.concepts!r} does not match concept {self.concept!r}; pass the "
                                 f"list as concept")
            concepts = listed
        self.concepts, self.concept = concepts, concepts_label(concepts)
        self.domain = check_domain(self.domain)
        self.method = build_objective_config(self.method)
        several = len(self.concepts) > 1
        if several:
            anchor = getattr(self.method, "anchor", None)
            if isinstance(anchor, str) and any(same_concept(anchor, c) for c in self.concepts):
                raise ValueError(f"anchor {anchor!r} is one of the concepts being removed {list(self.concepts)}")
            trajectories = self.method.num_trajectories
            if issubclass(objective_class(self.method), TrainedObjective) and trajectories % len(self.concepts):
                # every concept gets as many of the trajectories training draws from
                self.method = dataclasses.replace(
                    self.method, num_trajectories=-(-trajectories // len(self.concepts)) * len(self.concepts))
        if not isinstance(self.training, TrainingConfig):
            raise TypeError(f"training must be a du.TrainingConfig, got {self.training!r}")
        check_seed(self.seed)
        self.regularizers = check_regularizers(self.regularizers)
        self.method.check_regularizers(self.regularizers)
        self.strategy = resolve_strategy(self.strategy)
        if self.prompts is not None:
            prompts = self.prompts
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
            self.prompts, self.templates = list(prompts), None
            missing = [c for c in self.concepts if not any(c.lower() in p.lower() for p in self.prompts)] \
                if several else []
            if missing:
                raise ValueError(f"prompts must name every concept of the request; none names {missing}")
        else:
            chosen = validate_templates(self.templates) if self.templates is not None else TEMPLATES[self.domain]
            self.prompts = [t.format(c) for t in chosen for c in self.concepts]
            self.templates = chosen

    @classmethod
    def build(cls, concept: str | Sequence[str], method: str | ObjectiveConfig | None = None,
              **kwargs: Any) -> UnlearnRequest:
        """``resolve_request(concept, method, **kwargs)``, under the name earlier versions documented.

        Args:
            concept: what to remove.
            method: a method name or config; None: the default method (``resolve_request``).
            **kwargs: the other arguments of ``resolve_request`` (domain, steps, regularizers, options...).

        Returns:
            The validated request, with the library's defaults applied.

        Raises:
            ValueError, TypeError: as ``resolve_request``.
        """
        return resolve_request(concept, method, **kwargs)

    def check_regularizers_fit(self) -> None:
        """Each regularizer's own check of this request (e.g. gradient projection cannot retain the concept it
        removes); ``unlearn`` runs it just before training, after a resumed plan has compared its ledger.

        Raises:
            ValueError: a regularizer that cannot serve this request, naming why.
        """
        for regularizer in self.regularizers:
            for concept in self.concepts:
                regularizer.check_request(concept, self.domain)

    def record_fields(self) -> dict[str, Any]:
        """The ledger record's fields that describe the request (the rest come from training it).

        Returns:
            concept, domain, method (its name), method_config, strategy, training, prompts, steps and seed, as
            plain JSON-ready values; and concepts for a request of several.
        """
        several = {"concepts": list(self.concepts)} if len(self.concepts) > 1 else {}
        return {
            **several,
            "concept": self.concept,
            "domain": self.domain,
            "method": self.method.method,
            "method_config": self.method.to_dict(),
            "strategy": strategy_to_dict(self.strategy),
            "training": self.training.to_dict(),
            "prompts": list(self.prompts),
            "steps": self.training.steps,
            "seed": self.seed,
        }

    def signature(self) -> dict[str, Any]:
        """The settings a ledger record of this request must have: a resumed plan compares them with
        ``record_signature`` of the record in its place, so that a changed plan is refused instead of skipped.

        Returns:
            concept, concepts, domain, method_config, training, seed, regularizers, strategy and prompts, as the
            ledger stores them (through JSON: tuples become lists).
        """
        fields = {**self.record_fields(), "concepts": list(self.concepts)}
        return _signature(fields, [r.to_dict() for r in self.regularizers])


def _keep_pairs(keep: Sequence[str] | Mapping[str, Sequence[str]], domain: str) -> list[tuple[str, str]]:
    """``keep`` as (concept, domain) pairs: a list is in the request's ``domain``, a mapping names each domain."""
    if isinstance(keep, str):
        raise TypeError(f"keep must be a list of concepts or a dict of domain -> concepts, got the string {keep!r}")
    if isinstance(keep, Mapping):
        pairs = []
        for name, concepts in keep.items():
            if isinstance(concepts, str) or not isinstance(concepts, Sequence):
                raise TypeError(f"keep[{name!r}] must be a list of concepts, got {concepts!r}")
            pairs += [(check_concept(c, "keep concept"), check_domain(name)) for c in concepts]
        return pairs
    if not isinstance(keep, Sequence):
        raise TypeError(f"keep must be a list of concepts or a dict of domain -> concepts, got {keep!r}")
    return [(check_concept(c, "keep concept"), domain) for c in keep]


def keep_concepts(keep: Sequence[str] | Mapping[str, Sequence[str]], concept: str | Sequence[str], domain: str,
                  method: ObjectiveConfig, regularizers: Sequence[Regularizer] | Regularizer | None
                  ) -> tuple[ObjectiveConfig, Sequence[Regularizer] | Regularizer | None]:
    """The one way to name what a request removing ``concept`` keeps, for every method: ``(method config,
    regularizers)`` with ``keep`` added where each honours it; keeping ``concept`` itself is refused.

    - A method that keeps concepts by construction (a ``keep`` list and a ``vocabulary``, the closed form): the
      request's domain joins ``keep``; other domains join its vocabulary (over the built-in one when it has none),
      each embedded in its own domain's templates.
    - Gradient projection: every kept concept joins its ``keep`` (exact K/V invariants on its embedding).
    - A trained method without gradient projection: the kept concepts join its retain loss (``keep``).

    Args:
        keep: concepts in the request's domain (a list), or ``{domain: [concepts]}``.
        concept: the concept the request removes, or its list of concepts.
        domain: the request's domain.
        method: the request's method config.
        regularizers: the request's regularizers.

    Returns:
        The method config and regularizers, with the kept concepts added.

    Raises:
        ValueError: ``keep`` names a concept the request removes, or the method has no way to keep concepts.
        TypeError: ``keep`` is not a list or a mapping of lists.
    """
    pairs = _keep_pairs(keep, domain)
    removed = [concept] if isinstance(concept, str) else list(concept)
    kept_target = [c for c, _ in pairs if any(same_concept(c, r) for r in removed)]
    if kept_target:
        raise ValueError(f"keep names {kept_target[0]!r}, the concept this request removes; keep lists what must "
                         f"survive it")
    if not pairs:
        return method, regularizers
    own = [c for c, d in pairs if d == domain]
    listed = list(check_regularizers(regularizers))
    projections = [r for r in listed if isinstance(r, GradientProjection)]
    fields = {f.name for f in dataclasses.fields(method)}
    if {"keep", "vocabulary"} <= fields:
        others: dict[str, list[str]] = {}
        for c, d in pairs:
            if d != domain:
                others.setdefault(d, []).append(c)
        changes: dict[str, Any] = {"keep": list(dict.fromkeys([*method.keep, *own]))}
        if others:
            current = method.vocabulary
            if current is None:
                current = {d: list(cs) for d, cs in DEFAULT_VOCABULARY.items()}
            elif not isinstance(current, Mapping):
                current = {domain: list(current)}
            merged = {d: list(cs) for d, cs in current.items()}
            for d, cs in others.items():
                merged[d] = list(dict.fromkeys([*merged.get(d, []), *cs]))
            changes["vocabulary"] = merged
        return dataclasses.replace(method, **changes), listed
    if projections:
        everything = list(dict.fromkeys(c for c, _ in pairs))
        listed = [dataclasses.replace(r, keep=list(dict.fromkeys([*r.keep, *everything])))
                  if isinstance(r, GradientProjection) else r for r in listed]
        return method, listed
    if "keep" in fields:
        everything = list(dict.fromkeys(c for c, _ in pairs))
        kept = [c for c in everything if c.lower() not in {p.lower() for p in method.keep}]
        return dataclasses.replace(method, keep=(*method.keep, *kept)), listed
    raise ValueError(f"method {method.method!r} has no way to keep concepts (no keep list, no gradient "
                     f"projection): add regularizers=[du.GradientProjection()] to keep {[c for c, _ in pairs]}")


def record_signature(record: RequestRecord) -> dict[str, Any]:
    """``UnlearnRequest.signature`` read back from a ledger record. A solved method's report is recorded among the
    regularizers under the method's own name; the request never lists it, so it is left out.

    Args:
        record: a request's record from a ledger.

    Returns:
        The same keys as ``UnlearnRequest.signature``; equal to it when the record came from that request.
    """
    fields = {
        "concept": record.concept,
        "concepts": list(record.concepts),
        "domain": record.domain,
        "method_config": record.method_config,
        "training": record.training,
        "seed": record.seed,
        "strategy": record.strategy,
        "prompts": record.prompts,
    }
    # a solved method's report entry (named after the method, holding only its report) is no regularizer
    regularizers = [r for r in record.regularizers
                    if not (r.get("name") == record.method and set(r) <= {"name", "report"})]
    return _signature(fields, [{k: v for k, v in r.items() if k != "report"} for r in regularizers])


_SIGNATURE_KEYS = ("concept", "concepts", "domain", "method_config", "training", "seed", "regularizers", "strategy", "prompts")


def _signature(fields: dict[str, Any], regularizers: list[dict[str, Any]]) -> dict[str, Any]:
    values = {**fields, "regularizers": regularizers}
    # through JSON, as the ledger stores them: tuples become lists, keys sorted
    return json.loads(json.dumps({key: values[key] for key in _SIGNATURE_KEYS}, sort_keys=True, default=str))


def training_config(
    training: TrainingConfig | None, *, steps: int | None = None, rank: int | Literal["full"] | None = None,
    learning_rate: float | None = None, batch_size: int | None = None,
) -> TrainingConfig:
    """``training`` (default: ``TrainingConfig()``) with the shortcut fields that are given replaced: how
    ``steps=``, ``rank=``... of ``pipe.unlearn`` reach the config.

    Args:
        training: the config to start from; None: ``TrainingConfig()``. It is not changed.
        steps: replaces ``steps`` when given.
        rank: replaces ``rank`` when given.
        learning_rate: replaces ``learning_rate`` when given.
        batch_size: replaces ``batch_size`` when given.

    Returns:
        A new, validated ``TrainingConfig``.

    Raises:
        TypeError: ``training`` is not a ``TrainingConfig``.
        ValueError: a value ``TrainingConfig`` refuses.

    Examples:
        >>> config = training_config(None, steps=50, rank=8)
        >>> config.steps, config.rank, config.learning_rate
        (50, 8, 0.0001)
    """
    if training is not None and not isinstance(training, TrainingConfig):
        raise TypeError(f"training must be a du.TrainingConfig, got {training!r}")
    values = (training or TrainingConfig()).to_dict()
    for key, value in (("steps", steps), ("rank", rank), ("learning_rate", learning_rate), ("batch_size", batch_size)):
        if value is not None:
            values[key] = value
    return TrainingConfig(**values)


def resolve_request(
    concept: str | Sequence[str],
    method: str | ObjectiveConfig | None = None,
    *,
    domain: str | None = None,
    family: ModelFamily | None = None,
    world_recipe: WorldRecipe | None = None,
    removed: Sequence[str] = (),
    regularizers: Sequence[Regularizer] | Regularizer | None = None,
    keep: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    training: TrainingConfig | None = None,
    steps: int | None = None,
    rank: int | Literal["full"] | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    strategy: str | MergeStrategy | None = None,
    prompts: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    **options: Any,
) -> UnlearnRequest:
    """The validated request for a caller's options on a model ``family``, over a world's recipe: the one place
    where ``pipe.unlearn``, plan files and the command line turn options into a request.

    Each part comes from the first of: the caller's value, the world's recipe (``world_recipe.unlearn_kwargs``),
    the library's default (``engine/defaults.py``).

    Args:
        concept: what to remove, e.g. "van gogh", or a list of distinct concepts removed by this one request.
        method: a registered method name or a ready config. None: the recipe's method config (with ``options`` set
            over its settings), else ``defaults.default_method`` for ``family``: the recommended method with
            ``defaults.recommended_options(domain)`` under ``options``, or the trained method when training
            settings or regularizers are given.
        domain: "style", "object", "concept" (default) or a registered domain: picks the prompt templates. A
            recipe's own prompt domain (``"minicanvas-style"``) is used when none is given.
        family: the model family the request runs on (``families.family_of(pipe)``); None: not known yet (the
            recommended method of SD and SDXL).
        world_recipe: the calibrated settings of the world the request runs on (``World.request_recipe``), or None.
            Its retain pool (``preserve``) becomes the retain loss of a trained method that has none, less
            ``concept`` and ``removed``.
        removed: the concepts removed before this request (``pipe.removed_concepts``), for the recipe's retain pool.
        regularizers: e.g. ``[du.GradientProjection(keep=["monet"])]``; ``[]`` for none (over a recipe's).
        keep: concepts whose outputs must survive, a list (the request's domain) or ``{domain: [concepts]}``;
            every method honours it (``keep_concepts``).
        training: the full ``TrainingConfig``; ``steps``, ``rank``, ``learning_rate`` and ``batch_size`` replace its
            fields (over a recipe's when ``training`` is not given).
        seed: makes the request reproducible.
        strategy: "sequential" (default) or a merge strategy.
        prompts: explicit prompts instead of the domain's templates; ``templates`` replaces the templates.
        **options: fields of the method's config, e.g. ``negative_guidance=2.0``, ``anchor="a dog"``.

    Returns:
        The ``UnlearnRequest``, every field checked.

    Raises:
        ValueError, TypeError: a value that is not allowed, named with what is (from ``UnlearnRequest`` and the
            method's config); options given with a ready config; a recipe key that is not in ``RECIPE_KEYS``.

    Examples:
        >>> resolve_request("van gogh", domain="style").method.method  # no method, no training: the recommended
        'closed_form'
        >>> request = resolve_request("van gogh", domain="style", steps=50)  # training asked for: the trained method
        >>> request.method.method, request.training.steps
        ('esd', 50)
        >>> resolve_request("van gogh", steps=0)
        Traceback (most recent call last):
        ValueError: steps must be an integer >= 1, got 0
    """
    concepts = check_request_concepts(concept)
    recipe = dict(world_recipe.unlearn_kwargs) if world_recipe is not None else {}
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise TypeError(f"a world recipe sets only {', '.join(RECIPE_KEYS)}; got {unknown}")
    shortcuts = {"steps": steps, "rank": rank, "learning_rate": learning_rate, "batch_size": batch_size}
    trained = asks_for_training(training, regularizers, *shortcuts.values())
    if training is None:
        shortcuts = {key: recipe.get(key) if value is None else value for key, value in shortcuts.items()}
    if domain is None:
        domain = recipe.get("domain")
    if regularizers is None:
        regularizers = recipe.get("regularizers")
    if strategy is None:
        strategy = recipe.get("strategy")
    if method is None and recipe.get("method") is not None:
        config = _with_options(recipe["method"], options)
    else:
        chosen = method if method is not None else default_method(family, trained)
        if method is None and chosen == RECOMMENDED_METHOD:  # the caller's options (former names too) win
            options = {**recommended_options(domain), **_current_names(chosen, options)}
        config = build_objective_config(chosen, options)
    # the world's retain pool, unless the method's own retain list was given (``keep`` below adds to it)
    if world_recipe is not None and world_recipe.preserve and isinstance(config, TrainedObjectiveConfig) \
            and not config.keep:
        pool = world_recipe.preserve_for(concepts[0], [*removed, *concepts[1:]])
        if pool:
            config = dataclasses.replace(config, keep=pool, keep_weight=world_recipe.preserve_weight)
    if keep is not None:
        config, regularizers = keep_concepts(keep, concepts, check_domain(domain), config, regularizers)
    return UnlearnRequest(
        concepts[0] if len(concepts) == 1 else list(concepts),
        config,
        domain=domain,
        training=training_config(training, **shortcuts),
        seed=seed,
        regularizers=regularizers,
        strategy=strategy,
        prompts=prompts,
        templates=templates,
    )


def _with_options(config: ObjectiveConfig | str, options: Mapping[str, Any]) -> ObjectiveConfig:
    """A recipe's method (a name or a ready config) with the caller's ``options`` set over its settings."""
    if not isinstance(config, ObjectiveConfig):
        return build_objective_config(config, dict(options))
    settings = {k: v for k, v in config.to_dict().items() if k != "method"}
    return build_objective_config(config.method, {**settings, **_current_names(config.method, options)}) \
        if options else config


def _current_names(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` of ``method`` with former option names mapped to the current ones (their FutureWarning once,
    here), so that they can be merged over settings written with the current names."""
    registered = OBJECTIVES.get(method) if isinstance(method, str) else None
    if registered is None:
        return dict(options)
    return rename_options(f"method {method!r}", registered[0].renamed_options, options)


__all__ = ["RECIPE_KEYS", "UnlearnRequest", "keep_concepts", "record_signature", "resolve_request", "training_config"]
