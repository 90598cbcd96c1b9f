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
    "RequestAdapter": "kv.adapters",
    "ClassifierCheck": "engine.classifier_check",
    "ErasureCheck": "engine.erasure_check",
    "ErasureError": "engine.erasure_check",
    "PipelineBusyError": "engine.state",
    "ErasureWarning": "engine.erasure_check",
    "concept_embedding": "embeddings",
    "cosine_similarities": "embeddings",
    "LoraExport": "publishing.export",
    "Ledger": "engine.ledger",
    "LedgerError": "engine.ledger",
    "RequestRecord": "engine.ledger",
    "MergeStrategy": "kv.merging",
    "UnknownRequestError": "mixins.attach",
    "UnlearnMixin": "mixins.attach",
    "attach": "mixins.attach",
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
    "UnlearnRequest": "engine.request",
    "TrainingConfig": "engine.training_config",
    "UnlearnStableDiffusionPipeline": "pipelines",
    "UnlearnStableDiffusionXLPipeline": "pipelines",
    "UnlearnStableDiffusion3Pipeline": "pipelines",
    "UnlearnFluxPipeline": "pipelines",
    "load_pipeline": "pipelines",
    "World": "worlds",
    "register_world": "worlds",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names above load on first use
    from .kv.adapters import RequestAdapter
    from .engine.classifier_check import ClassifierCheck
    from .engine.erasure_check import ErasureCheck, ErasureError, ErasureWarning
    from .engine.state import PipelineBusyError
    from .embeddings import concept_embedding, cosine_similarities
    from .publishing.export import LoraExport
    from .engine.ledger import Ledger, LedgerError, RequestRecord
    from .kv.merging import MergeStrategy
    from .mixins.attach import UnknownRequestError, UnlearnMixin, attach
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
    from .engine.request import UnlearnRequest
    from .engine.training_config import TrainingConfig
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
