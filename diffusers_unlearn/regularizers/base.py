"""The regularizer interface: small hooks the trainer calls, knowing nothing of the objective.

Hooks, in the order the trainer calls them for one request:

* ``check_request(concept, domain)``: before anything runs, to refuse settings that cannot fit this request.
* ``setup(ctx)``: once, after the adapter and the objective are ready (compute masks, projectors, references).
* ``loss(ctx)``: an extra loss term per step (drift penalties), or None.
* ``transform_gradients(ctx)``: after backward and gradient synchronisation, before clipping (projection).
* ``after_step(ctx)``: after the optimizer step (keep parameters inside their constraint set).
* ``report()``: JSON-able figures for the ledger (what was protected, how much was masked...).

Regularizers run in ``order`` (lower first): masks before projections before penalties.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._deprecation import RenamedOptions, rename_options

if TYPE_CHECKING:
    from ..kv.adapters import TrainableAdapter
    from ..objectives import Objective


@dataclass
class TrainingContext:
    """What regularizers see of one request being trained; the trainer builds one per request.

    Args:
        pipe: the unlearning pipeline.
        denoiser: its denoiser (a UNet, or SD3's / Flux's transformer), with the request's adapter on it.
        adapter: the request's trainable adapter (LoRA factors, or a dense delta).
        objective: the request's erasure objective (its ``config`` holds the method settings).
        concept: the concept being removed.
        domain: its prompt domain.
        earlier: records of the requests before this one (anything with ``.concept`` and ``.domain``).
        base_weights: the original K/V weights, by module name.
        start_offsets: the model training starts from, minus the base, per layer (None: it starts at the base).
        step: the current optimiser step.
        state: scratch space shared by the regularizers of the request.
        progress: show progress bars for long set-ups (projectors, importance scores).
        concepts: every concept the request removes (empty: ``(concept,)``; for several, ``concept`` is their label).
    """

    pipe: Any
    denoiser: torch.nn.Module
    adapter: TrainableAdapter
    objective: Objective
    concept: str
    domain: str
    earlier: list[Any]  # records of the requests before this one (anything with .concept and .domain)
    base_weights: dict[str, torch.Tensor]  # the original K/V weights
    start_offsets: dict[str, torch.Tensor] | None  # training start model minus base (None: starts at the base)
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    progress: bool = False  # show progress bars for long set-ups (projector, importance scores)
    concepts: tuple[str, ...] = ()  # every concept removed (empty: just ``concept``)


@dataclass
class Regularizer(RenamedOptions):
    """Base class of the regularizers: hooks the trainer calls for one request, knowing nothing of the objective.

    A subclass is a dataclass of its settings with a ``name``, registered with ``register_regularizer``; it
    overrides the hooks it needs (the defaults do nothing). ``order`` sets who runs first (lower first: masks before
    projections before penalties); ``adapter_kind = "dense"`` asks for a full delta instead of a LoRA. A renamed
    setting's old name goes in ``renamed_options`` (old -> new) and keeps working for one release.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    adapter_kind: ClassVar[str | None] = None  # "dense" when it needs a full (masked) delta instead of a LoRA

    def check_request(self, concept: str, domain: str) -> None:
        """Refuse settings that cannot fit this request, before any model work (e.g. retaining the removed concept).

        Args:
            concept: the concept the request removes.
            domain: its prompt domain.

        Raises:
            ValueError: the settings do not fit the request (the default accepts every request).
        """

    def setup(self, ctx: TrainingContext) -> None:
        """Prepare once per request, after the adapter and the objective are ready (masks, projectors, references).

        Args:
            ctx: the request being trained.
        """

    def loss(self, ctx: TrainingContext) -> torch.Tensor | None:
        """An extra loss term for this step (drift penalties), added to the objective's loss.

        Args:
            ctx: the request being trained.

        Returns:
            A scalar tensor, or None for no term (the default).
        """
        return None

    def transform_gradients(self, ctx: TrainingContext) -> None:
        """Change the adapter's gradients in place, after backward and gradient synchronisation, before clipping.

        Args:
            ctx: the request being trained.
        """

    def after_step(self, ctx: TrainingContext) -> None:
        """Act after the optimiser step (e.g. keep the parameters inside their constraint set).

        Args:
            ctx: the request being trained.
        """

    def report(self) -> dict[str, Any]:
        """JSON-able figures for the request's ledger record (what was protected, how much was masked, ...)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **settings}``: the form ledgers and plan files store, read back by ``regularizer_from_dict``."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return {"name": self.name, **settings}


REGULARIZERS: dict[str, type[Regularizer]] = {}


def register_regularizer(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator: make ``cls`` available by ``cls.name``, so ledgers and plan files can name it.

    Args:
        cls: a ``Regularizer`` dataclass with a ``name``.

    Returns:
        ``cls`` itself.

    Raises:
        ValueError: ``cls.name`` is empty or already registered (registries refuse duplicates).
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name must be set")
    if cls.name in REGULARIZERS:
        registered = REGULARIZERS[cls.name]
        raise ValueError(
            f"regularizer {cls.name!r} is already registered (by {registered.__module__}.{registered.__qualname__}); "
            f"pick another name. Registered regularizers: {sorted(REGULARIZERS)}"
        )
    REGULARIZERS[cls.name] = cls
    return cls


def regularizer_from_dict(data: dict[str, Any]) -> Regularizer:
    """Rebuild a regularizer from its stored form (what ``Regularizer.to_dict`` writes; plan files use it too).

    Args:
        data: ``{"name": ..., **settings}``; a renamed setting's old name is taken with a ``FutureWarning``
            (``stored_regularizer_settings`` maps a stored record's silently first).

    Returns:
        The regularizer, its settings checked by its own constructor.

    Raises:
        ValueError: an unknown name or setting (naming the allowed ones), or a setting out of range.
        TypeError: an old setting name beside its new one.

    Examples:
        >>> regularizer_from_dict({"name": "l2_drift", "weight": 1000.0})
        L2Drift(weight=1000.0, reference='previous')
    """
    if not isinstance(data, dict) or data.get("name") not in REGULARIZERS:
        name = data.get("name") if isinstance(data, dict) else data
        raise ValueError(f"unknown regularizer {name!r}; registered: {sorted(REGULARIZERS)}")
    cls = REGULARIZERS[data["name"]]
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    settings = rename_options(f"regularizer {cls.name!r}", cls.renamed_options,
                              {k: v for k, v in data.items() if k != "name"})
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"regularizer {data['name']!r} has no setting(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**settings)


def stored_regularizer_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A regularizer entry as a ledger record stores it (``{"name": ..., **settings, "report": ...}``), with the
    setting names of earlier versions replaced by the current ones, silently: a ledger saved by an earlier version
    loads without a warning and compares equal to a request made with the new names.

    Args:
        data: the stored entry (an unregistered name is left for the ledger's check to refuse).

    Returns:
        A new dict under the current names.

    Raises:
        TypeError: an old name beside its new one.
    """
    cls = REGULARIZERS.get(data.get("name"))  # type: ignore[arg-type]
    return rename_options(str(data.get("name")), cls.renamed_options if cls is not None else {}, data, warn=False)


def check_regularizers(regularizers: object) -> list[Regularizer]:
    """The request's regularizers as a list in run order (``order``, lower first).

    Args:
        regularizers: None, one ``Regularizer``, or an iterable of them.

    Returns:
        The regularizers, sorted by ``order``.

    Raises:
        TypeError: an item that is not a ``Regularizer``.
        ValueError: the same regularizer given twice.
    """
    if regularizers is None:
        return []
    if isinstance(regularizers, Regularizer):
        regularizers = [regularizers]
    items = list(regularizers)  # type: ignore[arg-type]
    for item in items:
        if not isinstance(item, Regularizer):
            registered = ", ".join(f"du.{cls.__name__}" for cls in REGULARIZERS.values())
            raise TypeError(f"regularizers must be Regularizer objects (registered: {registered}); got {item!r}")
    names = [r.name for r in items]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"each regularizer may appear once per request; repeated: {duplicated}")
    return sorted(items, key=lambda r: r.order)
