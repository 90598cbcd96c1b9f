"""The recommended recipe: what ``pipe.unlearn(concept, domain=...)`` does when no method is named.

Chosen from the MiniCanvas bench (docs/benchmarks.md, "Recommended default"): the closed-form method keeps the
other concepts and every earlier removal by construction, needs no training and no tuning, and costs well under a
second per request. A request that names no method but asks for training (steps, learning rate, rank, batch size,
a ``TrainingConfig``) or for regularizers is a trained request: it gets ``TRAINED_METHOD``, as before this default
existed. The CLI (``unlearn`` without ``--method``) and plan files (a request without ``method:``) follow the
same rule.

Joint transformers (SD3, Flux) get ``TRAINED_METHOD`` as their recommended method (``recommended_method``). There
the closed form can solve only the first joint block, and it keeps each concept once per tokenizer segment and solve
timestep. With the default vocabulary and steps that fills the text stream, so the request changes nothing: 7050
kept states on the tiny SD3, 3500 on the tiny Flux, against a 64-wide stream (measured). The same counts exceed a
real SD3-medium's width (1536) and Flux's (3072); not measured on a real checkpoint. ESD trains every joint block,
and on the taught tiny SD3 and Flux it moves the target 2.5-36 times as much as unrelated prompts (seeds 0-7,
docs/deploy.md). The method is resolved once the pipeline is known: ``pipe.unlearn`` passes its family, and the CLI
and plans re-resolve a recipe-chosen method after loading the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._deprecation import rename_options
from .objectives import OBJECTIVES

if TYPE_CHECKING:
    from .families import ModelFamily

RECOMMENDED_METHOD = "closed_form"
TRAINED_METHOD = "esd"
# The recommended method's settings for one kind of concept, over its config's defaults (which are the styles').
# Objects: six MiniCanvas object removals with the style settings kept the other objects at IRA 47.2 (base 93.8);
# a stronger soft penalty on the kept concepts' tokens keeps them (94.4) at some erasure, which guidance 2 restores
# (UA 94.4, held-out 91.7, IRA 90.3, CRA 98.6; docs/benchmarks.md section 8).
RECOMMENDED_DOMAIN_OPTIONS: dict[str, dict[str, Any]] = {"object": {"keep_weight": 5.0, "negative_guidance": 2.0}}
# Every recommended request: the exactly kept span may fill at most this fraction of the K/V input width. With the
# built-in vocabulary the kept states fill the whole 32-wide input of the tiny pipelines, and the request would
# change nothing; capped, the strongest kept directions stay exact and the rest are kept softly. On SD's 768-wide
# input and MiniCanvas's 512-wide one the kept span stays below the cap, so nothing changes there.
RECOMMENDED_KEPT_FRACTION = 0.75


def recommended_method(family: ModelFamily | None = None) -> str:
    """The method a request that names none and asks for no training gets on ``family``: ``RECOMMENDED_METHOD``,
    or ``TRAINED_METHOD`` where the K/V layers read a different text state in each block (SD3's and Flux's joint
    transformers). None (family not known yet): ``RECOMMENDED_METHOD``."""
    return TRAINED_METHOD if family is not None and family.per_block_text_states else RECOMMENDED_METHOD


def resolve_method(method: Any, training_arguments: Mapping[str, Any], family: ModelFamily | None = None) -> Any:
    """``method`` itself when given; otherwise ``recommended_method(family)``, or ``TRAINED_METHOD`` when any of
    ``training_arguments`` (the request's training settings and regularizers) is set."""
    if method is not None:
        return method
    trained = any(value is not None and not (isinstance(value, (list, tuple)) and not value)
                  for value in training_arguments.values())
    return TRAINED_METHOD if trained else recommended_method(family)


def domain_kind(domain: str | None) -> str | None:
    """"style" or "object" for those built-in domains and a world's ("minicanvas-object"); None for any other."""
    if domain is None:
        return None
    for kind in ("style", "object"):
        if domain == kind or domain.endswith(f"-{kind}"):
            return kind
    return None


def recommended_options(requested: Any, resolved: Any, domain: str | None,
                        options: Mapping[str, Any]) -> dict[str, Any]:
    """The method ``options`` of a request, over the recommended settings for ``domain``'s kind when the recipe
    chose the method (``requested`` None and ``resolved`` the recommended method); the options given win."""
    if requested is not None or resolved != RECOMMENDED_METHOD:
        return dict(options)
    # an option given under its former name wins too (with its FutureWarning)
    given = rename_options(f"method {resolved!r}", OBJECTIVES[resolved][0].renamed_options, options)
    return {"max_kept_fraction": RECOMMENDED_KEPT_FRACTION,
            **RECOMMENDED_DOMAIN_OPTIONS.get(domain_kind(domain) or "", {}), **given}
