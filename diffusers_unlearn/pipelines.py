"""Ready pipeline classes with ``UnlearnMixin``, and one loader for every model name the command line accepts.

``UnlearnStableDiffusionPipeline``, ``UnlearnStableDiffusionXLPipeline``, ``UnlearnStableDiffusion3Pipeline`` and
``UnlearnFluxPipeline`` load with ``from_pretrained`` like their diffusers parents.
Loaded from a folder (or Hub repo) that ``save_unlearned`` wrote, they come back with the base weights, the ledger and the adapters of that folder, in mode "folded". They save under their parent's class name, so
plain diffusers loads what they write.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from ._warn import warn
from .publishing.export import is_hub_repo_id
from .mixins.attach import UnlearnMixin, attach
from .engine.saved_folder import FOLDER_ATTR, UNLEARNING_DIR
from .worlds import describe_worlds, get_world, world_names

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fetch_unlearning_folder(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Path | None:
    """Where the ``unlearning/`` folder of a loaded model lies: the local folder itself, or, for a Hub id, a
    snapshot of just that subfolder (diffusers downloads only the pipeline components)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not is_hub_repo_id(str(name_or_path)):
        return None
    from huggingface_hub import snapshot_download  # looked up at call time (tests stand in for the Hub)

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                allow_patterns=[f"{UNLEARNING_DIR}/*"],
                revision=kwargs.get("revision"),
                token=kwargs.get("token"),
                cache_dir=kwargs.get("cache_dir"),
                local_files_only=bool(kwargs.get("local_files_only", False)),
            )
        )
    except Exception as err:  # noqa: BLE001 - the weights loaded; say what is missing and go on
        warn(f"could not fetch {UNLEARNING_DIR}/ from {name_or_path} ({type(err).__name__}); if it is an unlearned "
             "pipeline, its ledger is not restored and the loaded (folded) weights act as the base")
        return None


def _finish_loading(pipe: Any, name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Any:
    folder = _fetch_unlearning_folder(name_or_path, kwargs)
    if folder is not None:
        object.__setattr__(pipe, FOLDER_ATTR, str(folder))
    return attach(pipe)  # restores (or starts) the state now, while the weights are the ones loaded


class _ReadyClassMixin:
    """``from_pretrained`` that restores a saved unlearning state (``UnlearnMixin.save_pretrained`` writes the
    parent's class name, so plain diffusers loads what these classes save)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load like the diffusers parent class, then restore the unlearning state of a ``save_unlearned`` folder.

        From a folder or Hub repo that ``save_unlearned`` wrote, the pipeline comes back with the base K/V weights,
        the ledger and the adapters, in mode ``"folded"``; from any other, its weights become the base.

        Args:
            pretrained_model_name_or_path: a local pipeline folder or a Hub model id.
            **kwargs: what the diffusers parent's ``from_pretrained`` takes (``torch_dtype``, ``revision``,
                ``token``, ...).

        Returns:
            The pipeline, with ``UnlearnMixin``.

        Raises:
            TypeError: the denoiser is of no supported family.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return _finish_loading(pipe, pretrained_model_name_or_path, kwargs)


class UnlearnStableDiffusionPipeline(_ReadyClassMixin, UnlearnMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (1.x / 2.x) with continual unlearning (``unlearn``, ``audit``, ``rollback``,
    ``fold``, ``save_unlearned``, ``push_to_hub``)."""


class UnlearnStableDiffusionXLPipeline(_ReadyClassMixin, UnlearnMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with continual unlearning. Projection and similarity use the concatenated
    hidden states of both text encoders: what the UNet's cross-attention reads."""


class UnlearnStableDiffusion3Pipeline(_ReadyClassMixin, UnlearnMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD 3 / 3.5) with continual unlearning. Requests adapt the text-stream
    ``add_k_proj`` / ``add_v_proj`` of every joint block; objectives work on the flow-matching velocity."""


class UnlearnFluxPipeline(_ReadyClassMixin, UnlearnMixin, FluxPipeline):
    """``FluxPipeline`` with continual unlearning. Requests adapt the text-stream ``add_k_proj`` / ``add_v_proj``
    of the dual-stream blocks (the single-stream blocks are left alone, see ``families/registry.py``); FLUX.1-dev's
    guidance embedding replaces classifier-free guidance in every objective."""


READY_CLASSES: dict[str, type] = {
    "StableDiffusionPipeline": UnlearnStableDiffusionPipeline,
    "StableDiffusionXLPipeline": UnlearnStableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": UnlearnStableDiffusion3Pipeline,
    "FluxPipeline": UnlearnFluxPipeline,
}


def _dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype | None:
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {torch_dtype!r}; allowed: {sorted(_DTYPES)}")
    return _DTYPES[torch_dtype]


def load_pipeline(
    model: str | os.PathLike,
    *,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Any:
    """A pipeline with ``UnlearnMixin`` for any model name the command line and plan files accept.

    A ready class (``UnlearnStableDiffusionPipeline``, ...) is used when the folder's ``model_index.json`` names a
    supported pipeline class; any other pipeline is loaded by ``DiffusionPipeline`` and attached.

    Args:
        model: a world name (``"minicanvas"``, ``"tiny"``, ``"tiny-sdxl"`` or another registered in
            ``diffusers_unlearn.worlds``), a local pipeline folder (a ``save_unlearned`` folder comes back with its
            ledger) or a Hub model id.
        torch_dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch.dtype`` (None: as stored).
        device: where to move the pipeline (None: leave it on the CPU).
        **kwargs: passed to ``from_pretrained`` for folders and Hub ids (``revision``, ``token``, ...).

    Returns:
        The pipeline, with ``UnlearnMixin``.

    Raises:
        ValueError: an empty model name, an unknown dtype, or a ``model_index.json`` that is not a JSON map.
        FileNotFoundError: neither a world, a pipeline folder nor a Hub id.
        TypeError: a pipeline of no supported family (other DiTs, unconditional UNets), naming the supported ones.

    Examples:
        >>> pipe = load_pipeline("tiny")
        >>> type(pipe).__name__, pipe.removed_concepts
        ('StableDiffusionPipeline', [])
    """
    dtype = _dtype(torch_dtype)
    name = os.fspath(model) if isinstance(model, os.PathLike) else model
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a world name ({', '.join(world_names())}), a pipeline folder or a Hub id, "
                         f"got {model!r}")
    world = get_world(name)
    if world is not None:
        pipe = attach(world.load_pipeline())
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        path = Path(name)
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                holds_ledger = (path / "ledger.json").is_file()
                hint = " (it holds a ledger: pass the base model it was made on)" if holds_ledger else ""
                raise FileNotFoundError(f"{path} has no model_index.json: not a diffusers pipeline folder{hint}")
            try:
                config = json.loads(index.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise ValueError(f"{index} is not valid JSON (a diffusers model_index.json is a JSON map): {err}") \
                    from None
            if not isinstance(config, dict):
                raise ValueError(f"{index} must hold a JSON map, got {type(config).__name__}")
            class_name = config.get("_class_name")
        elif is_hub_repo_id(name):
            class_name = DiffusionPipeline.load_config(name, **{k: v for k, v in kwargs.items() if k in (
                "revision", "token", "cache_dir", "local_files_only")}).get("_class_name")
        else:
            raise FileNotFoundError(
                f"model {name!r} is not a world name, an existing pipeline folder or a Hub model id; worlds: "
                f"{describe_worlds()}"
            )
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        ready = READY_CLASSES.get(class_name)
        if ready is not None:
            pipe = ready.from_pretrained(name, **kwargs)
        else:
            pipe = _finish_loading(DiffusionPipeline.from_pretrained(name, **kwargs), name, kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


__all__ = [
    "UnlearnStableDiffusionPipeline",
    "UnlearnStableDiffusionXLPipeline",
    "UnlearnStableDiffusion3Pipeline",
    "UnlearnFluxPipeline",
    "READY_CLASSES",
    "load_pipeline",
]
