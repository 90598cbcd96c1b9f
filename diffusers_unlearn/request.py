"""``UnlearnRequest``: one removal request, described and validated in one place.

``pipe.unlearn(...)``, plan files and the command line all build one, so a request is checked the same way
wherever it comes from, before anything touches the model; the trainer takes it whole. It knows the prompts it
trains on, the fields its ledger record gets and its signature (what a resumed plan compares with the ledger).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._validation import check_seed
from .ledger import RequestRecord
from .merging import MergeStrategy, resolve_strategy, strategy_to_dict
from .objectives import ObjectiveConfig, build_objective_config
from .prompts import TEMPLATES, check_concept, check_domain, same_concept, validate_templates
from .recipe import recommended_options, resolve_method
from .regularizers import GradientProjection, Regularizer, check_regularizers
from .trainer import TrainingConfig
from .vocabulary import DEFAULT_VOCABULARY

if TYPE_CHECKING:
    from .families import ModelFamily


@dataclass
class UnlearnRequest:
    """One removal request, validated on construction.

    Args:
        concept: what to remove, e.g. "van gogh".
        method: a registered method name ("esd", "ca", ...) or a ready method config (``du.CAConfig(...)``); a
            name becomes its config with default options (``UnlearnRequest.build`` passes options).
        domain: "style", "object", "concept" (default) or a registered domain: picks the prompt templates.
        training: steps, learning rate, rank, batch size, mixed precision...
        seed: makes the request reproducible (adapter init, trajectories, minibatches).
        regularizers: e.g. ``[du.GradientProjection(retain=["monet"])]``; kept sorted by their ``order``.
        strategy: "sequential" (default) or a merge strategy (name or ``du.MergeStrategy``).
        prompts: explicit prompts instead of the domain's templates filled with the concept.
        templates: templates to fill instead of the domain's (ignored when ``prompts`` is given).

    After construction ``method`` is an ``ObjectiveConfig``, ``domain`` a known domain, ``strategy`` resolved,
    ``prompts`` the list the request trains on and ``templates`` the templates behind them (None for explicit
    prompts).
    """

    concept: str
    method: ObjectiveConfig | str = "esd"
    domain: str | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seed: int = 0
    regularizers: Sequence[Regularizer] | Regularizer | None = ()
    strategy: str | MergeStrategy | None = None
    prompts: Sequence[str] | None = None
    templates: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.concept = check_concept(self.concept)
        self.domain = check_domain(self.domain)
        self.method = build_objective_config(self.method)
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
        else:
            chosen = validate_templates(self.templates) if self.templates is not None else TEMPLATES[self.domain]
            self.prompts, self.templates = [t.format(self.concept) for t in chosen], chosen

    @classmethod
    def build(
        cls,
        concept: str,
        method: str | ObjectiveConfig | None = None,
        *,
        domain: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        regularizers: Sequence[Regularizer] | Regularizer | None = None,
        strategy: str | MergeStrategy | None = None,
        rank: int | Literal["full"] | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        training: TrainingConfig | None = None,
        prompts: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        family: ModelFamily | None = None,
        keep: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        **method_options: Any,
    ) -> UnlearnRequest:
        """The request ``pipe.unlearn`` takes as keywords: ``steps``, ``rank``, ``learning_rate`` and
        ``batch_size`` are shortcuts for the same ``TrainingConfig`` fields; other keywords are options of the
        method's config (``anchor="a dog"``, ``negative_guidance=2.0``). ``family``: the model family the request
        will run on (``families.family_of(pipe)``), which the recommended recipe depends on. ``keep``: concepts
        whose outputs must survive (``keep_concepts``), honoured by every method."""
        # no method: the recommended recipe, or the trained default when training or regularizers are asked for
        resolved = resolve_method(method, dict(steps=steps, rank=rank, learning_rate=learning_rate,
                                               batch_size=batch_size, training=training, regularizers=regularizers),
                                  family)
        config = build_objective_config(resolved, recommended_options(method, resolved, domain, method_options))
        if keep is not None:
            config, regularizers = keep_concepts(keep, concept, check_domain(domain), config, regularizers)
        return cls(
            concept,
            config,
            domain=domain,
            training=training_config(training, steps=steps, rank=rank, learning_rate=learning_rate,
                                     batch_size=batch_size),
            seed=seed,
            regularizers=regularizers,
            strategy=strategy,
            prompts=prompts,
            templates=templates,
        )

    def check_regularizers_fit(self) -> None:
        """Each regularizer's own check of this request (e.g. gradient projection cannot retain the concept it
        removes); ``unlearn`` runs it just before training, after a resumed plan has compared its ledger."""
        for regularizer in self.regularizers:
            regularizer.check_request(self.concept, self.domain)

    def record_fields(self) -> dict[str, Any]:
        """The ledger record's fields that describe the request (the rest come from training it)."""
        return {
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
        """The settings a ledger record of this request must have (a resumed plan compares them)."""
        fields = self.record_fields()
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


def keep_concepts(keep: Sequence[str] | Mapping[str, Sequence[str]], concept: str, domain: str,
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
        concept: the concept the request removes.
        domain: the request's domain.
        method: the request's method config.
        regularizers: the request's regularizers.

    Returns:
        The method config and regularizers, with the kept concepts added.

    Raises:
        ValueError: ``keep`` names ``concept``, or the method has no way to keep concepts.
        TypeError: ``keep`` is not a list or a mapping of lists.
    """
    pairs = _keep_pairs(keep, domain)
    kept_target = [c for c, _ in pairs if same_concept(c, concept)]
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
    """``UnlearnRequest.signature`` read back from a ledger record."""
    fields = {
        "concept": record.concept,
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


_SIGNATURE_KEYS = ("concept", "domain", "method_config", "training", "seed", "regularizers", "strategy", "prompts")


def _signature(fields: dict[str, Any], regularizers: list[dict[str, Any]]) -> dict[str, Any]:
    values = {**fields, "regularizers": regularizers}
    # through JSON, as the ledger stores them: tuples become lists, keys sorted
    return json.loads(json.dumps({key: values[key] for key in _SIGNATURE_KEYS}, sort_keys=True, default=str))


def training_config(
    training: TrainingConfig | None, *, steps: int | None = None, rank: int | Literal["full"] | None = None,
    learning_rate: float | None = None, batch_size: int | None = None,
) -> TrainingConfig:
    """``training`` (default: ``TrainingConfig()``) with the shortcut fields that are given replaced."""
    if training is not None and not isinstance(training, TrainingConfig):
        raise TypeError(f"training must be a du.TrainingConfig, got {training!r}")
    values = (training or TrainingConfig()).to_dict()
    for key, value in (("steps", steps), ("rank", rank), ("learning_rate", learning_rate), ("batch_size", batch_size)):
        if value is not None:
            values[key] = value
    return TrainingConfig(**values)


__all__ = ["UnlearnRequest", "keep_concepts", "record_signature", "training_config"]
