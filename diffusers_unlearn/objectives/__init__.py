"""Unlearning methods, trained or solved. A new method is one module (or folder) here plus one import line below;
the module registers its config and objective class with ``register_objective``."""

from .base import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    ObjectiveContext,
    SolveContext,
    SolvedObjective,
    TrainedObjective,
    TrainedObjectiveConfig,
    TrajectoryObjective,
    build_objective_config,
    objective_class,
    objective_for,
    register_objective,
    stored_method_config,
)
from .ca import CAConfig, CAObjective
from .closed_form import ClosedFormConfig, ClosedFormObjective
from .esd import ESDConfig, ESDObjective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveContext",
    "SolveContext",
    "SolvedObjective",
    "TrainedObjective",
    "TrainedObjectiveConfig",
    "TrajectoryObjective",
    "build_objective_config",
    "objective_class",
    "objective_for",
    "register_objective",
    "stored_method_config",
    "ESDConfig",
    "ESDObjective",
    "CAConfig",
    "CAObjective",
    "ClosedFormConfig",
    "ClosedFormObjective",
]
