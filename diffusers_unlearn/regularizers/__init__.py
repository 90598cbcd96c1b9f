"""Regularizers that bound drift across requests. A new one is one module here plus one import line below."""

from .base import (
    REGULARIZERS,
    Regularizer,
    TrainingContext,
    check_regularizers,
    register_regularizer,
    regularizer_from_dict,
    stored_regularizer_settings,
)
from .drift import L1Drift, L2Drift
from .projection import GradientProjection
from .selective import SelectiveFinetune

__all__ = [
    "L1Drift",
    "L2Drift",
    "SelectiveFinetune",
    "GradientProjection",
    "REGULARIZERS",
    "Regularizer",
    "TrainingContext",
    "check_regularizers",
    "register_regularizer",
    "regularizer_from_dict",
    "stored_regularizer_settings",
]
