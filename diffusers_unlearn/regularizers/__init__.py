"""Regularizers that bound drift across requests. A new one is one module here plus one import line below."""

from .base import (
    REGULARIZERS,
    Regularizer,
    TrainingContext,
    check_regularizers,
    register_regularizer,
    regularizer_from_dict,
)

__all__ = [
    "REGULARIZERS",
    "Regularizer",
    "TrainingContext",
    "check_regularizers",
    "register_regularizer",
    "regularizer_from_dict",
]
