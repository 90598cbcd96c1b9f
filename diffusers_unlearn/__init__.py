"""diffusers-unlearn: continual concept unlearning for diffusers text-to-image pipelines.

Each removal request becomes one small, constrained adapter on the K/V projections that read the text (a UNet's
cross-attention, or the text stream of SD3's and Flux's joint blocks),
recorded in a ledger; regularizers (drift penalties, selective fine-tuning, gradient projection, merging) keep a
stream of requests from collapsing the model.
"""

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING

from ._version import __version__


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' notice that an image processor "requires torchvision" and falls back to PIL: diffusers'
    pipeline imports trigger it on every use, and nothing here uses transformers' image processors (DEVELOPERS.md:
    torchvision must not be installed beside this torch). Every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


# The logger exists before transformers is imported (logging.getLogger makes it), so this imports nothing.
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNotice())

# Public name -> the submodule that defines it. Imported on first use (PEP 562), so that ``import diffusers_unlearn``
# and ``diffusers-unlearn --help`` do not pay for torch, diffusers and transformers.
_EXPORTS = {
    "RequestAdapter": "adapters",
    "ClassifierCheck": "classifier_check",
    "ErasureCheck": "erasure_check",
    "ErasureError": "erasure_check",
    "PipelineBusyError": "state",
    "ErasureWarning": "erasure_check",
    "concept_embedding": "embeddings",
    "cosine_similarities": "embeddings",
    "LoraExport": "export",
    "Ledger": "ledger",
    "LedgerError": "ledger",
    "RequestRecord": "ledger",
    "MergeStrategy": "merging",
    "UnknownRequestError": "mixin",
    "UnlearnMixin": "mixin",
    "attach": "mixin",
    "CAConfig": "objectives",
    "ESDConfig": "objectives",
    "ObjectiveConfig": "objectives",
    "register_objective": "objectives",
    "PlanError": "plan",
    "load_plan": "plan",
    "run_plan": "plan",
    "TEMPLATES": "prompts",
    "register_templates": "prompts",
    "GradientProjection": "regularizers",
    "L1Drift": "regularizers",
    "L2Drift": "regularizers",
    "Regularizer": "regularizers",
    "SelectiveFinetune": "regularizers",
    "register_regularizer": "regularizers",
    "UnlearnRequest": "request",
    "TrainingConfig": "training_config",
    "UnlearnStableDiffusionPipeline": "pipelines",
    "UnlearnStableDiffusionXLPipeline": "pipelines",
    "UnlearnStableDiffusion3Pipeline": "pipelines",
    "UnlearnFluxPipeline": "pipelines",
    "load_pipeline": "pipelines",
    "World": "worlds",
    "register_world": "worlds",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names above load on first use
    from .adapters import RequestAdapter
    from .classifier_check import ClassifierCheck
    from .erasure_check import ErasureCheck, ErasureError, ErasureWarning
    from .state import PipelineBusyError
    from .embeddings import concept_embedding, cosine_similarities
    from .export import LoraExport
    from .ledger import Ledger, LedgerError, RequestRecord
    from .merging import MergeStrategy
    from .mixin import UnknownRequestError, UnlearnMixin, attach
    from .objectives import CAConfig, ESDConfig, ObjectiveConfig, register_objective
    from .pipelines import (
        UnlearnFluxPipeline,
        UnlearnStableDiffusion3Pipeline,
        UnlearnStableDiffusionPipeline,
        UnlearnStableDiffusionXLPipeline,
        load_pipeline,
    )
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
    from .training_config import TrainingConfig
    from .worlds import World, register_world


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: du.testing, du.minicanvas, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(__all__))


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
    "ErasureCheck",
    "ClassifierCheck",
    "ErasureError",
    "ErasureWarning",
    "PipelineBusyError",
    "UnlearnStableDiffusionPipeline",
    "UnlearnStableDiffusionXLPipeline",
    "UnlearnStableDiffusion3Pipeline",
    "UnlearnFluxPipeline",
    "load_pipeline",
    "LoraExport",
    "PlanError",
    "load_plan",
    "run_plan",
    "World",
    "register_world",
]
