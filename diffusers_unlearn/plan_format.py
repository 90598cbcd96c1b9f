"""The plan file's format: reading ``PLAN.yaml`` and checking its shape and field names, without the engine.

Nothing here imports torch, diffusers or transformers, so that a plan with a misspelled field is refused at once
(``diffusers-unlearn run``); ``plan.parse_plan`` runs the same checks first, then validates every request with the
engine (``request.resolve_request``). The format itself is documented in ``plan.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .engine.defaults import asks_for_training, default_method
from .engine.training_config import TrainingConfig

PLAN_KEYS = ("model", "output", "base_model", "strategy", "defaults", "requests", "torch_dtype", "device")
"""The fields a plan may have at its top level."""
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingConfig))
"""The request fields that are ``TrainingConfig`` fields."""
REQUEST_KEYS = (
    "concept", "domain", "method", "seed", "regularizers", "strategy", "prompts", "templates", "keep", *TRAINING_KEYS
)
"""The fields every request (and ``defaults:``) may have; any other field must be an option of its method."""

# A method name -> the names of its options (its config's fields), or None for a method it does not know (the
# engine then reports the unknown method).
MethodFields = Callable[[str], Sequence[str] | None]


class PlanError(ValueError):
    """A plan that cannot run (bad field, or a ledger that does not match it), with where and why.

    A ``ValueError``, so that callers that catch bad values catch it too; the command line reports its message.
    """


class PlanLoader(yaml.SafeLoader):
    """A SafeLoader for plans: a key given twice is refused, and "1e-4" is a number (YAML 1.1 reads it as a
    string; plans are written by people who mean a number).

    Examples:
        >>> yaml.load("learning_rate: 1e-4", Loader=PlanLoader)
        {'learning_rate': 0.0001}
        >>> yaml.load("{concept: cat, concept: dog}", Loader=PlanLoader)
        Traceback (most recent call last):
        yaml.constructor.ConstructorError: while constructing a mapping ... found duplicate key 'concept' ...
    """


def _construct_unique_mapping(loader: PlanLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A key given twice is refused (PyYAML keeps the last one silently, so ``{concept: cat, concept: dog}`` would
    remove "dog")."""
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


PlanLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_plan_file(path: str | os.PathLike) -> Any:
    """The parsed YAML of the plan file at ``path`` (not yet checked), read with ``PlanLoader``.

    Args:
        path: the plan file, UTF-8 YAML.

    Returns:
        Whatever the YAML holds (``check_plan_fields`` checks that it is a plan).

    Raises:
        FileNotFoundError: no such file.
        PlanError: the file is not UTF-8 or not valid YAML (a duplicate key included).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=PlanLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise PlanError(f"{path} is not UTF-8 text: {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise PlanError(f"{path} is not valid YAML: {' '.join(str(err).split())[:500]}") from None


def location(source: str, position: int | None, concept: Any = None) -> str:
    """Where in a plan an error is, as every plan error names it.

    Args:
        source: how the plan is named (its path).
        position: the request's 1-based place; None for the plan itself.
        concept: the request's concept, named when it is a string (a list of strings: joined by ", ").

    Returns:
        ``source`` alone, or ``"<source>: request <position> ('<concept>')"``.

    Examples:
        >>> location("PLAN.yaml", 2, "cat"), location("PLAN.yaml", None)
        ("PLAN.yaml: request 2 ('cat')", 'PLAN.yaml')
    """
    if position is None:
        return source
    if isinstance(concept, (list, tuple)) and concept and all(isinstance(c, str) for c in concept):
        concept = ", ".join(concept)  # a request of several concepts: their label
    return f"{source}: request {position}" + (f" ({concept!r})" if isinstance(concept, str) else "")


def check_plan_fields(data: Any, *, source: str, method_fields: MethodFields) -> None:
    """Check a plan's shape and every field name, the checks that need no engine.

    Args:
        data: the parsed YAML (``read_plan_file``).
        source: how errors name the plan (its path).
        method_fields: the option names of a method, by name (``plan.parse_plan`` asks the objective registry;
            the command line reads them from the source, so that torch is not imported for a typo).

    Raises:
        PlanError: the plan is not a map; it has an unknown field; 'defaults' is not a map or sets 'concept';
            'requests' is not a non-empty list; a request is not a map with a 'concept' that is a string or a
            non-empty list of strings (several concepts removed by one request); a request field is
            neither a request key nor an option of its method (the nearest allowed names are suggested);
            torch_dtype or device is not a string.

    Examples:
        >>> options = {"esd": ["negative_guidance"]}.get  # the option names of each method
        >>> check_plan_fields({"model": "tiny", "output": "out", "requests": [{"concept": "cat", "method": "esd",
        ...                    "negative_guidance": 2.0}]}, source="PLAN.yaml", method_fields=options)
        >>> check_plan_fields({"model": "tiny", "output": "out", "requests": [{"concept": "cat", "method": "esd",
        ...                    "negative_guidence": 2.0}]}, source="PLAN.yaml", method_fields=options)
        Traceback (most recent call last):
        diffusers_unlearn.plan_format.PlanError: PLAN.yaml: request 1 ('cat'): unknown field(s) ['negative_guidence']
        ('negative_guidence': did you mean 'negative_guidance'?); ...
    """
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan is a map with 'model', 'output' and 'requests', got {type(data).__name__}")
    unknown = sorted(set(data) - set(PLAN_KEYS), key=str)
    if unknown:
        raise PlanError(f"{source}: unknown field(s) {unknown}; allowed: {list(PLAN_KEYS)}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PlanError(f"{source}: 'defaults' must be a map of request fields, got {defaults!r}")
    if "concept" in defaults:
        raise PlanError(f"{source}: 'defaults' cannot set 'concept'")
    requests = data.get("requests")
    if not isinstance(requests, list) or not requests:
        raise PlanError(f"{source}: 'requests' must be a non-empty list of requests")
    for position, raw in enumerate(requests, 1):
        if not isinstance(raw, dict):
            raise PlanError(f"{location(source, position)}: a request is a map with at least 'concept', got {raw!r}")
        fields = {**defaults, **raw}
        concept = fields.get("concept")
        if "concept" not in raw:
            raise PlanError(f"{location(source, position)}: missing 'concept'")
        several = isinstance(concept, list) and bool(concept) and all(isinstance(c, str) for c in concept)
        if not isinstance(concept, str) and not several:
            raise PlanError(f"{location(source, position)}: concept must be a string, got {type(concept).__name__} "
                            f"{concept!r} (quote it in YAML: yes/no/on/off and numbers are not strings there; "
                            "several concepts removed by one request are a non-empty list of strings)")
        _check_request_field_names(fields, method_fields, location(source, position, concept))
    for key in ("torch_dtype", "device"):
        if data.get(key) is not None and not isinstance(data.get(key), str):
            raise PlanError(f"{source}: {key} must be a string, got {data.get(key)!r}")


def _check_request_field_names(fields: dict[str, Any], method_fields: MethodFields, at: str) -> None:
    """A request field that is neither a request key nor an option of its method (a typo, most often) is refused
    with every field allowed there and the nearest ones. The method is the request's own, else the default one
    (``defaults.default_method``, the model family not known yet)."""
    method = fields.get("method")
    if method is None:
        method = default_method(None, asks_for_training(*(fields.get(k) for k in ("regularizers", *TRAINING_KEYS))))
    options = method_fields(method) if isinstance(method, str) else None
    if options is None:
        return  # the engine's error names the method that is wrong
    allowed = [*REQUEST_KEYS, *options]
    unknown = [k for k in fields if k not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.6)
        if near:
            hints.append(f"{key!r}: did you mean {' or '.join(repr(n) for n in near)}?")
    raise PlanError(f"{at}: unknown field(s) {sorted(map(str, unknown))}" + (f" ({'; '.join(hints)})" if hints else "")
                    + f"; a request takes {', '.join(REQUEST_KEYS)}, and the options of its method {method!r}: "
                    f"{', '.join(options)}")


__all__ = ["PLAN_KEYS", "REQUEST_KEYS", "TRAINING_KEYS", "PlanError", "PlanLoader", "check_plan_fields",
           "location", "read_plan_file"]
