"""diffusers-unlearn: continual concept unlearning for diffusers text-to-image pipelines.

Each removal request becomes one small, constrained adapter on the UNet's cross-attention K/V projections,
recorded in a ledger; regularizers (drift penalties, selective fine-tuning, gradient projection, merging) keep a
stream of requests from collapsing the model.
"""

__version__ = "0.1.0"

from .adapters import RequestAdapter
from .embeddings import concept_embedding, cosine_similarities
from .export import LoraExport
from .ledger import Ledger, LedgerError, RequestRecord
from .merging import MergeStrategy
from .mixin import UnknownRequestError, UnlearnMixin, attach
from .objectives import CAConfig, ESDConfig, ObjectiveConfig, register_objective
from .plan import PlanError, load_plan, run_plan
from .prompts import TEMPLATES, register_templates
from .regularizers import (
    GradientProjection,
    L1Drift,
    L2Drift,
    Regularizer,
    SelectiveFinetune,
    register_regularizer,
)
from .request import UnlearnRequest
from .trainer import TrainingConfig

_PIPELINE_NAMES = ("UnlearnStableDiffusionPipeline", "UnlearnStableDiffusionXLPipeline", "load_pipeline")


def __getattr__(name: str):
    # ``du.testing`` imports diffusers' pipeline classes; load it only when it is used
    if name == "testing":
        import importlib

        return importlib.import_module(".testing", __name__)
    if name in _PIPELINE_NAMES:  # the ready classes import diffusers' pipeline classes too
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "testing",
    "attach",
    "UnlearnMixin",
    "UnlearnRequest",
    "concept_embedding",
    "cosine_similarities",
    "MergeStrategy",
    "TrainingConfig",
    "ESDConfig",
    "CAConfig",
    "ObjectiveConfig",
    "register_objective",
    "L1Drift",
    "L2Drift",
    "SelectiveFinetune",
    "GradientProjection",
    "Regularizer",
    "register_regularizer",
    "TEMPLATES",
    "register_templates",
    "Ledger",
    "LedgerError",
    "RequestRecord",
    "RequestAdapter",
    "UnknownRequestError",
    "UnlearnStableDiffusionPipeline",
    "UnlearnStableDiffusionXLPipeline",
    "load_pipeline",
    "LoraExport",
    "PlanError",
    "load_plan",
    "run_plan",
]
