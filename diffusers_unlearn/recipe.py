"""The recommended recipe: what ``pipe.unlearn(concept, domain=...)`` does when no method is named.

Chosen from the MiniCanvas bench (docs/benchmarks.md, "Recommended default"): the closed-form method keeps the
other concepts and every earlier removal by construction, needs no training and no tuning, and costs well under a
second per request. A request that names no method but asks for training (steps, learning rate, rank, batch size,
a ``TrainingConfig``) or for regularizers is a trained request: it gets ``TRAINED_METHOD``, as before this default
existed. The CLI (``unlearn`` without ``--method``) and plan files (a request without ``method:``) follow the
same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RECOMMENDED_METHOD = "closed_form"
TRAINED_METHOD = "esd"


def resolve_method(method: Any, training_arguments: Mapping[str, Any]) -> Any:
    """``method`` itself when given; otherwise the recommended method, or ``TRAINED_METHOD`` when any of
    ``training_arguments`` (the request's training settings and regularizers) is set."""
    if method is not None:
        return method
    trained = any(value is not None and not (isinstance(value, (list, tuple)) and not value)
                  for value in training_arguments.values())
    return TRAINED_METHOD if trained else RECOMMENDED_METHOD
