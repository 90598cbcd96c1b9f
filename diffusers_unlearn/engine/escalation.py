"""Escalation: a request whose erasure check fails is served again with stronger method settings.

``pipe.unlearn(concept, erasure_check=..., escalate=[{"negative_guidance": 2.0}, {"negative_guidance": 3.0}])``
serves the request as asked; when the check finds the concept not erased, nothing is committed and the request is
served again with the first entry's method settings over its own, then the next. The first attempt that erases is
committed; its record lists the attempts before it. When none erases, the last one is committed with a warning (or
refused, with ``require_erasure=True``), as a request without escalation is.

Each entry names fields of the request's method config (``ClosedFormConfig``, ``ESDConfig``, ...). Escalation pays
only with a check that sees what an evaluator sees (``ClassifierCheck``): the built-in shift check calls erased
requests whose concept stays recognisable in its images (docs/benchmarks/closed-form.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .._deprecation import rename_options
from .erasure_check import ErasureCheck
from .request import UnlearnRequest


def check_erasure_check(check: Any) -> Any:
    """``check`` itself (None: the built-in ``ErasureCheck()``) when it has ``measure`` and ``verdict``."""
    if check is None:
        return ErasureCheck()
    if not (callable(getattr(check, "measure", None)) and callable(getattr(check, "verdict", None))):
        raise TypeError(f"erasure_check must be an ErasureCheck, a ClassifierCheck or an object with measure() and "
                        f"verdict() like them, got {check!r}")
    return check


def escalated_requests(request: UnlearnRequest, escalate: Sequence[Mapping[str, Any]] | None) -> list[UnlearnRequest]:
    """``request``, then one request per entry of ``escalate`` with its method settings over the request's own;
    every entry is checked before anything is trained."""
    if escalate is None:
        return [request]
    if isinstance(escalate, (str, Mapping)) or not isinstance(escalate, Sequence):
        raise TypeError(f"escalate must be a list of method-setting mappings, e.g. [{{'negative_guidance': 2.0}}], "
                        f"got {escalate!r}")
    config = request.method
    fields = sorted(f.name for f in dataclasses.fields(config) if f.init)
    attempts = [request]
    for i, overrides in enumerate(escalate):
        if not isinstance(overrides, Mapping) or not overrides:
            raise TypeError(f"escalate entry {i} must be a non-empty mapping of {config.method} settings, "
                            f"got {overrides!r}")
        overrides = rename_options(config.method, type(config).renamed_options, overrides)
        unknown = sorted(str(k) for k in overrides if k not in fields)
        if unknown:
            raise ValueError(f"escalate entry {i} names {unknown}, which are not {config.method} settings; "
                             f"allowed: {fields}")
        # a request made from templates is rebuilt from them (same prompts), so each attempt keeps its templates
        prompts = None if request.templates is not None else request.prompts
        attempts.append(dataclasses.replace(request, method=dataclasses.replace(config, **overrides), prompts=prompts))
    return attempts


def effective_escalation(request: UnlearnRequest,
                         escalate: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]] | None:
    """``escalate`` less the entries that would serve ``request`` as it already is (a ladder starting at the
    request's own settings, e.g. an object request whose guidance is already 2)."""
    if escalate is None or isinstance(escalate, (str, Mapping)) or not isinstance(escalate, Sequence):
        return escalate  # escalated_requests says what is wrong
    config = request.method
    return [step for step in escalate
            if not (isinstance(step, Mapping) and step
                    and all(hasattr(config, k) and getattr(config, k) == v for k, v in step.items()))]


def escalation_options(escalate: Sequence[Mapping[str, Any]] | None, attempt: int) -> dict[str, Any]:
    """The method settings attempt ``attempt`` (0: the request as asked) changed."""
    return {} if attempt == 0 or escalate is None else dict(escalate[attempt - 1])
