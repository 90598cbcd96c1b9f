"""What a request gets when its caller does not say: the recommended method, the trained method, and the
recommended method's settings per kind of concept.

``request.resolve_request`` applies these rules for ``pipe.unlearn``, plan files and the command line alike:

- No method and no training asked for: ``recommended_method(family)``. That is the closed form, which keeps the
  other concepts and every earlier removal by construction and needs no training or tuning
  (docs/benchmarks/closed-form.md, "Recommended default"), except on joint transformers (SD3, Flux): there the
  closed form solves only the first joint block and its kept states fill the text stream, so the request would
  change nothing (docs/concepts/sd3-flux.md); they get ``TRAINED_METHOD``.
- No method but training settings (steps, learning rate, rank, batch size, a ``TrainingConfig``) or regularizers:
  a trained request, ``TRAINED_METHOD``.
- The recommended method gets ``recommended_options(domain)`` under the options the caller gives.

Nothing here imports torch: plan files and the command line check a request's fields against these rules before
the engine loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..families.registry import ModelFamily

RECOMMENDED_METHOD = "closed_form"
"""The method of a request that names none and asks for no training (``recommended_method``)."""
TRAINED_METHOD = "esd"
"""The method of a request that names none but asks for training, and the recommended one on SD3 and Flux."""
RECOMMENDED_DOMAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "style": {"negative_guidance": 0.0, "ridge": 0.1, "siblings": 16, "sibling_weight": 1.6},
    "object": {"keep_weight": 5.0, "negative_guidance": 1.0, "ridge": 0.1, "siblings": 16, "sibling_weight": 8.0}}
"""The recommended method's settings for one kind of concept, over its config's defaults, chosen on a stream of
removals where nothing else is named (docs/benchmarks/retention.md). Nothing in them names a concept.

- Styles map onto the anchor itself: aimed past it, an erased style's prompt lost its object too ("a bear in
  <removed style> style" drew no bear); on the anchor the bear is drawn in another style.
- Siblings (16 draws per word, total weight 1.6 per prompt and word): each word of every removed concept is also
  seen beside random token embeddings, and those states are kept softly. The concepts nobody named that share a
  word with a removed one ("neon dots" beside a removed "neon lines") then keep most of their images: over 12 style
  removals named through the API, 75-83% of the unnamed kept styles against 31-33% without (on three splits of
  the removed and kept styles); on one split 2 more of 48 removed-style images stayed recognised.
- A ridge of 0.1 (relative to the mean eigenvalue of the solve's key covariance) bounds each edit: the K/V drift
  stays near 3.5 instead of 11 without a bound.
- Objects keep the stronger soft penalty on the kept concepts' tokens and aim one anchor-distance past their anchor
  (guidance 1): guidance 2 lost most of the other objects and the styles in the erased objects' prompts, guidance
  0 erased too little. Their siblings weigh 8: the styles drawn in the erased objects' prompts stay (1.6 lost a
  few); the kept objects nobody named are lost with or without them.
- Both kinds share the ridge: a stream's solve is joint, so a request re-solves every earlier removal (and its
  siblings) with its own settings (in a mixed stream with unbounded objects the K/V drift jumped from 2 to 68 at
  the first object request and fell back to 7 at the next style request)."""
RECOMMENDED_ESCALATION: dict[str, tuple[dict[str, Any], ...]] = {
    "style": ({"ridge": 1e-4}, {"ridge": 1e-4, "negative_guidance": 1.0}, {"ridge": 1e-4, "negative_guidance": 2.0}),
    "object": ({"ridge": 1e-4}, {"ridge": 1e-4, "negative_guidance": 2.0})}
"""What a recommended request whose erasure check fails is solved again with, in turn, per kind of concept (when the
caller passes no ``escalate``): a style the check still finds is solved without the bound first (still on its
anchor, so its prompts keep their objects), then aimed past its anchor; an object without the bound, then further
past its anchor (``engine/escalation.py``)."""
RECOMMENDED_KEPT_FRACTION = 0.75
"""Every recommended request: the exactly kept span may fill at most this fraction of the K/V input width, so that a
narrow text space (the tiny pipelines' 32-wide one, filled by the built-in vocabulary) keeps room to erase; the
strongest kept directions stay exact and the rest are kept softly. Wide inputs (SD's 768, MiniCanvas's 512) stay
below the cap with the built-in vocabulary, so nothing changes there."""


def recommended_method(family: ModelFamily | None = None) -> str:
    """The method of a request that names none and asks for no training.

    Args:
        family: the model family the request runs on (``families.family_of(pipe)``); None when it is not known yet.

    Returns:
        ``TRAINED_METHOD`` where the K/V layers read a different text state in each block (SD3's and Flux's joint
        transformers), ``RECOMMENDED_METHOD`` otherwise (and for an unknown family).

    Examples:
        >>> recommended_method()
        'closed_form'
    """
    return TRAINED_METHOD if family is not None and family.per_block_text_states else RECOMMENDED_METHOD


def asks_for_training(*settings: Any) -> bool:
    """Whether a request's training settings and regularizers ask for training: any of them given (not None, and
    not an empty list: ``regularizers=[]`` asks for none).

    Args:
        *settings: the request's ``training``, ``regularizers``, ``steps``, ``rank``, ``learning_rate`` and
            ``batch_size`` as the caller gave them (None: not given).

    Returns:
        True when a request naming no method should get ``TRAINED_METHOD``.

    Examples:
        >>> asks_for_training(None, [], None), asks_for_training(None, None, 50)
        (False, True)
    """
    return any(value is not None and not (isinstance(value, (list, tuple)) and not value) for value in settings)


def default_method(family: ModelFamily | None, trained: bool) -> str:
    """The method of a request that names none.

    Args:
        family: the model family the request runs on; None when it is not known yet.
        trained: whether the request asks for training (``asks_for_training``).

    Returns:
        ``TRAINED_METHOD`` when ``trained``, else ``recommended_method(family)``.

    Examples:
        >>> default_method(None, trained=False), default_method(None, trained=True)
        ('closed_form', 'esd')
    """
    return TRAINED_METHOD if trained else recommended_method(family)


def domain_kind(domain: str | None) -> str | None:
    """The kind of concept a domain holds, for the per-kind settings (``RECOMMENDED_DOMAIN_OPTIONS``).

    Args:
        domain: a prompt domain name, or None.

    Returns:
        "style" or "object" for those built-in domains and a world's ("minicanvas-object"); None for any other.

    Examples:
        >>> domain_kind("minicanvas-object"), domain_kind("concept")
        ('object', None)
    """
    if domain is None:
        return None
    for kind in ("style", "object"):
        if domain == kind or domain.endswith(f"-{kind}"):
            return kind
    return None


def recommended_options(domain: str | None) -> dict[str, Any]:
    """The recommended method's settings for a request in ``domain``; the caller's own options go over them.

    Args:
        domain: the request's prompt domain, or None.

    Returns:
        ``max_kept_fraction`` (``RECOMMENDED_KEPT_FRACTION``) and the domain kind's ``RECOMMENDED_DOMAIN_OPTIONS``.

    Examples:
        >>> recommended_options("style")
        {'max_kept_fraction': 0.75, 'negative_guidance': 0.0, 'ridge': 0.1, 'siblings': 16, 'sibling_weight': 1.6}
        >>> recommended_options("object")["siblings"], recommended_options("object")["sibling_weight"]
        (16, 8.0)
    """
    return {"max_kept_fraction": RECOMMENDED_KEPT_FRACTION,
            **RECOMMENDED_DOMAIN_OPTIONS.get(domain_kind(domain) or "", {})}


def recommended_escalation(domain: str | None, method: str) -> list[dict[str, Any]] | None:
    """The escalation of a request served with the recommended method and settings (``RECOMMENDED_ESCALATION``).

    Args:
        domain: the request's prompt domain, or None.
        method: the name of the method that serves it.

    Returns:
        The ladder of method settings for the domain's kind, or None (no escalation) for another kind or method.

    Examples:
        >>> recommended_escalation("style", "closed_form")[0]
        {'ridge': 0.0001}
        >>> recommended_escalation("object", "closed_form")
        [{'ridge': 0.0001}, {'ridge': 0.0001, 'negative_guidance': 2.0}]
        >>> recommended_escalation("concept", "closed_form") is None
        True
    """
    if method != RECOMMENDED_METHOD:
        return None
    ladder = RECOMMENDED_ESCALATION.get(domain_kind(domain) or "")
    return [dict(step) for step in ladder] if ladder else None


def escalation_unless_set(ladder: Sequence[Mapping[str, Any]] | None,
                          given: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A default ladder, unless the caller's own method options set a setting it changes: then the caller's value
    stands and nothing escalates (``pipe.unlearn`` and the command line's world recipes alike).

    Args:
        ladder: the default escalation (``recommended_escalation``, a world recipe's), or None.
        given: the method options the caller set.

    Returns:
        The ladder's steps, or None (no escalation).

    Examples:
        >>> escalation_unless_set([{"ridge": 1e-4}], {})
        [{'ridge': 0.0001}]
        >>> escalation_unless_set([{"ridge": 1e-4}], {"ridge": 0.5}) is None
        True
    """
    steps = [dict(step) for step in ladder or ()]
    if not steps or any(key in given for step in steps for key in step):
        return None
    return steps


__all__ = ["RECOMMENDED_DOMAIN_OPTIONS", "RECOMMENDED_ESCALATION", "RECOMMENDED_KEPT_FRACTION", "RECOMMENDED_METHOD",
           "TRAINED_METHOD", "asks_for_training", "default_method", "domain_kind", "escalation_unless_set",
           "recommended_escalation", "recommended_method", "recommended_options"]
