"""A bench world's calibrated recipe for one request: what the demo serves and ``diffusers-unlearn unlearn <world>``
uses by default (registered for MiniCanvas in ``diffusers_unlearn.worlds``).

Every number comes from the bench's own settings (``Hyperparameters``, ``BenchSettings``, the world's evaluation
sampling), so a retuned world changes the demo, the bench and the command line together.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..evaluation.metrics import check_eval_domain
from ..worlds import WorldRecipe
from .protocols import PROTOCOLS
from .runner import BenchSettings, request_kwargs
from .world import BenchWorld, minicanvas_world

# The closed-form solve, verified by the world's classifier: the demo's protocol and a style request's default. It
# erases every removed style through 12 requests, and the check re-solves, with stronger negative guidance, the
# requests it leaves recognisable (docs/benchmarks/closed-form.md). It keeps the styles it is told to keep; styles
# nobody named go (the honest protocol, docs/benchmarks/minicanvas.md), which gradient projection keeps better
# while erasing less.
RECOMMENDED_PROTOCOL = "closed_form+verify"
# A request that names a trained method (or asks for training): gradient projection, the single-request recipe
# that keeps the most of the world over that stream (GP + merging keeps more, but it is a strategy of the stream).
TRAINED_PROTOCOL = "gp"
# The recommended (protocol, method) of a request that names neither, per domain. Objects: Concept Ablation onto a
# concrete object with the retain loss, under gradient projection. After six object requests it erased every one
# and kept the other objects and the styles at base (UA 100, IRA 94.4, CRA 100), where the closed form kept the
# other objects at IRA 47.2 (docs/benchmarks/minicanvas.md, six object requests).
RECOMMENDED_RECIPES: dict[str, tuple[str, str | None]] = {"style": (RECOMMENDED_PROTOCOL, None),
                                                          "object": (TRAINED_PROTOCOL, "ca")}


def world_recipe(world: BenchWorld, domain: str | None, method: str | None,
                 protocol: str | None = None) -> WorldRecipe:
    """The settings of one request on ``world`` (``domain`` "style" or "object") served as the bench serves it.
    ``method`` None: the domain's recommended recipe (``RECOMMENDED_RECIPES``); the closed form is served by its
    own protocol, a trained method by ``TRAINED_PROTOCOL``."""
    if domain is None:
        raise ValueError(f"{world.name} requests need a domain: style or object (--domain on the command line)")
    try:
        check_eval_domain(domain)
    except ValueError:
        raise ValueError(f"{world.name} knows the domains style and object, got {domain!r}") from None
    if protocol is None:
        if method is None:
            protocol, method = RECOMMENDED_RECIPES[domain]
        else:
            protocol = RECOMMENDED_PROTOCOL if method == PROTOCOLS[RECOMMENDED_PROTOCOL].method else TRAINED_PROTOCOL
    if method is None:
        method = PROTOCOLS[protocol].method or BenchSettings.method
    settings = BenchSettings(requests=1, domain=domain, method=method, protocols=[protocol])
    kwargs: dict[str, Any] = request_kwargs(world, settings, PROTOCOLS[protocol], concept="")
    del kwargs["concept"]  # the caller's; the settings above do not depend on it for a single-concept request
    # how the request is checked and escalated are pipe.unlearn's own arguments, not the request's
    erasure_check, escalate = kwargs.pop("erasure_check", None), kwargs.pop("escalate", None)
    method = kwargs["method"]
    preserve = None
    if getattr(method, "keep", ()):
        # the bench's retain loss keeps the pool less the concept and the earlier removals, which are known only
        # when the request is served: the recipe carries the pool (WorldRecipe.preserve_for), not the config
        preserve = world.vocabulary()[kwargs["domain"]]
        options = {k: v for k, v in method.to_dict().items() if k not in ("method", "keep", "keep_weight")}
        kwargs["method"] = type(method)(**options)
    hp = settings.hparams
    vocabulary = world.vocabulary()
    pool = sum(len(concepts) for concepts in vocabulary.values())
    regularizers = ", ".join(r.name for r in kwargs["regularizers"]) or "none"
    if protocol.startswith("gp"):
        neighbors = "all" if hp.gp_neighbors is None else hp.gp_neighbors
        regularizers += (f" (all {pool} {world.name} concepts kept)" if neighbors == "all"
                         else f" (the {neighbors} nearest of {pool} {world.name} concepts kept)")
    if kwargs["method"].method == "closed_form":
        summary = (f"{world.name} recipe: {describe_config(kwargs['method'])} (solved, no training), prompts of domain "
                   f"{kwargs['domain']!r}, keeping the {pool} {world.name} concepts and the earlier removals")
        ladder = ", then ".join(", ".join(f"{k}={v}" for k, v in step.items()) for step in escalate or ())
        if escalate and erasure_check is not None:
            summary += (f"; verified by the {domain} classifier on {erasure_check.images_per_concept} check images, "
                        f"solved again with {ladder} while it still recognises the concept")
        elif escalate:  # the recommended escalation, decided by pipe.unlearn's default erasure check
            summary += f"; solved again with {ladder} while the erasure check still finds the concept"
    else:
        retain = (f", a retain loss (weight {hp.preserve_weight}) on the {len(preserve)} {world.name} {domain}s "
                  "less the concept and the earlier removals" if preserve else "")
        summary = (f"{world.name} recipe: {describe_config(kwargs['method'])}, prompts of domain {kwargs['domain']!r}, {hp.steps} "
                   f"steps, learning rate {hp.learning_rate}, rank {hp.rank}, regularizers: {regularizers}{retain}")
    return WorldRecipe(kwargs, vocabulary=vocabulary, neighbors=hp.gp_neighbors, summary=summary, preserve=preserve,
                       preserve_weight=hp.preserve_weight, erasure_check=erasure_check, escalate=escalate)


def describe_config(config: Any) -> str:
    """A method config in a short readable form: its name and the settings that differ from its defaults, with
    a collection shown by its size (``closed_form(negative_guidance=2.0, vocabulary=<108 concepts>)``)."""
    shown = []
    for spec in dataclasses.fields(config):
        if spec.name == "method":
            continue
        value = getattr(config, spec.name)
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if value == default:
            continue
        if isinstance(value, dict):
            value = f"<{sum(len(v) for v in value.values())} concepts>"
        elif isinstance(value, (list, tuple)):
            value = f"<{len(value)} concepts>" if value else "[]"
        else:
            value = repr(value)
        shown.append(f"{spec.name}={value}")
    return f"{config.method}({', '.join(shown)})"


def minicanvas_recipe(domain: str | None, method: str | None) -> WorldRecipe:
    """MiniCanvas's recipe (the world of ``bench.minicanvas_world()``)."""
    return world_recipe(minicanvas_world(), domain, method)


__all__ = ["RECOMMENDED_PROTOCOL", "RECOMMENDED_RECIPES", "TRAINED_PROTOCOL", "minicanvas_recipe", "world_recipe"]
