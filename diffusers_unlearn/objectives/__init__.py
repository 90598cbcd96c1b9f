"""Unlearning objectives. A new method is one module here plus one import line below."""

from .base import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    ObjectiveContext,
    TrainedObjectiveConfig,
    TrajectoryObjective,
    build_objective_config,
    objective_for,
    register_objective,
)
from .ca import CAConfig, CAObjective
from .closed_form import ClosedFormConfig, ClosedFormObjective
from .esd import ESDConfig, ESDObjective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveContext",
    "TrainedObjectiveConfig",
    "TrajectoryObjective",
    "build_objective_config",
    "objective_for",
    "register_objective",
    "ESDConfig",
    "ESDObjective",
    "CAConfig",
    "CAObjective",
    "ClosedFormConfig",
    "ClosedFormObjective",
]
