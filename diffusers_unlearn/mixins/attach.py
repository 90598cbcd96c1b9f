"""``UnlearnMixin``: continual unlearning as pipeline methods, in the way diffusers' loader mixins add behaviour.

One capability per mixin, combined here as diffusers combines its loaders in the pipeline classes:
``RequestStreamMixin`` (unlearn, audit, rollback, fold) and ``SavingMixin`` (save, LoRA export, model card, push).
"""

from __future__ import annotations

from typing import Any

from .saving import SavingMixin
from ..engine.state import UnknownRequestError, UnlearningState, check_pipeline, unlearning_state
from .unlearning import RequestStreamMixin


class UnlearnMixin(RequestStreamMixin, SavingMixin):
    """Adds continual unlearning to a diffusers pipeline of a supported family (``families/registry.py``): SD 1.x/2.x and
    SDXL UNets, SD3 and Flux transformers.

    Use ``du.attach(pipe)`` on an existing pipeline, or a ready class such as ``UnlearnStableDiffusionPipeline``.
    The methods come from two mixins, one capability each: ``RequestStreamMixin`` (unlearn, audit, rollback, fold)
    and ``SavingMixin`` (save, LoRA export, model card, Hub push).
    """


_MIXED_CLASSES: dict[type, type] = {}


def attach(pipe: Any) -> Any:
    """Give an existing pipeline instance the ``UnlearnMixin`` behaviour (``unlearn``, ``audit``, ``rollback``, ...).

    The instance's class becomes a subclass of its own class and ``UnlearnMixin`` with the same name, so
    ``save_pretrained`` still writes the original class name and plain diffusers loads the folder. Its current K/V
    weights become the base (or, for a ``save_unlearned`` folder, the saved base, ledger and adapters come back).

    Args:
        pipe: a diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, SD3, Flux).

    Returns:
        The same object, now an ``UnlearnMixin``.

    Raises:
        TypeError: a pipeline of no supported family, naming the supported ones.
        ValueError: a denoiser that already carries peft/LoRA layers (fuse and unload them first).

    Examples:
        >>> import diffusers_unlearn as du
        >>> pipe = attach(du.testing.tiny_pipeline(seed=0))
        >>> isinstance(pipe, du.UnlearnMixin), type(pipe).__name__, pipe.unlearning_mode
        (True, 'StableDiffusionPipeline', 'stacked')
    """
    check_pipeline(pipe)
    if not isinstance(pipe, UnlearnMixin):
        cls = type(pipe)
        if cls not in _MIXED_CLASSES:
            _MIXED_CLASSES[cls] = type(cls.__name__, (UnlearnMixin, cls), {"__module__": cls.__module__})
        pipe.__class__ = _MIXED_CLASSES[cls]
    unlearning_state(pipe)
    return pipe


__all__ = ["UnknownRequestError", "UnlearnMixin", "UnlearningState", "attach"]
