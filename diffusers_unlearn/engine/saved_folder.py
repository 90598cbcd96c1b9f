"""The layout of a folder that ``save_unlearned`` writes, and reading its ``unlearning/`` part back.

::

    model_index.json, unet/, vae/, text_encoder/, ...   a plain diffusers pipeline; the UNet holds FOLDED weights
    README.md                                           model card (removed concepts, request table)
    unlearning/ledger.json, unlearning/adapters/        the ledger and one native artifact per request
    unlearning/lora/<request_id>.safetensors            each request in diffusers' LoRA format, relative to the BASE
    unlearning/base_kv.safetensors                      the true base K/V weights (the UNet only has folded ones)
    unlearning/state.json                               fingerprints and mode, written last

Writing lives in ``export``; reading lives here, below ``state`` (which restores a loaded folder's ledger) and
``hub`` (which checks a folder before pushing it).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..kv import adapters as ad
from .._atomic import sibling_lock
from .._validation import check_repo_id
from ..families.registry import denoiser_of
from .ledger import (
    LEDGER_FILE,
    REQUEST_ID,
    Ledger,
    LedgerError,
    check_adapter_fits,
    check_fields,
    fingerprint,
    parse_json,
    read_ledger_dir,
)

logger = logging.getLogger(__name__)

UNLEARNING_DIR = "unlearning"
LORA_DIR = "lora"
BASE_KV_FILE = "base_kv.safetensors"
STATE_FILE = "state.json"
CARD_FILE = "README.md"
SAVED_FORMAT = 1
FOLDER_ATTR = "_unlearned_folder"  # set by the ready classes' from_pretrained (Hub downloads land elsewhere)

@dataclass
class SavedUnlearning:
    """What a saved folder's ``unlearning/`` holds: the true base K/V weights, the ledger and the artifacts."""

    base_weights: dict[str, torch.Tensor]
    ledger: Ledger
    artifacts: dict[str, ad.RequestAdapter]
    origin: dict[str, Any]  # the folder and the base model's Hub id, for the model card of a later save


def saved_files(directory: str | os.PathLike) -> list[str]:
    """Every file of a saved folder, as sorted POSIX paths relative to it (hidden files and folders left out)."""
    directory = Path(directory)
    files = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(rel.as_posix())
    return sorted(files)


def check_unlearned_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """Check that ``directory`` is a folder ``save_unlearned`` wrote; return its ``unlearning/state.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a folder")
    missing = [
        name
        for name in ("model_index.json", CARD_FILE, f"{UNLEARNING_DIR}/{STATE_FILE}", f"{UNLEARNING_DIR}/{LEDGER_FILE}")
        if not (directory / name).is_file()
    ]
    if missing:
        raise LedgerError(
            f"{directory} is not an unlearned pipeline folder (missing {', '.join(missing)}); write one with "
            "pipe.save_unlearned(...) or `diffusers-unlearn fold`"
        )
    return read_saved_state(directory)


def read_saved_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / UNLEARNING_DIR / STATE_FILE
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path} is unreadable or corrupted: {err}") from err
    data = parse_json(text, str(path))
    if not isinstance(data, dict) or data.get("format") != SAVED_FORMAT:
        raise LedgerError(f"{path} is not a diffusers-unlearn saved-pipeline state (format {SAVED_FORMAT})")
    check_saved_state(data, str(path))
    return data


def _is_base_model(value: Any) -> bool:
    try:
        check_repo_id(value, "base_model")
    except (TypeError, ValueError):
        return False
    return True


def _is_lora_entry(request_id: str, entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("file") == f"{UNLEARNING_DIR}/{LORA_DIR}/{request_id}.safetensors"


# field -> (check, what it must be), for unlearning/state.json
_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == SAVED_FORMAT, f"{SAVED_FORMAT}"),
    "library_version": (lambda v: isinstance(v, str), "a string"),
    "mode": (lambda v: v == "folded", "'folded'"),
    "pipeline_class": (lambda v: isinstance(v, str) and v.isidentifier(), "a class name"),
    "base_model": (lambda v: v is None or _is_base_model(v), "null or a Hub model id"),
    "base_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "folded_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "requests": (lambda v: isinstance(v, list) and all(isinstance(i, str) and REQUEST_ID.fullmatch(i) for i in v),
                 "a list of request ids like 'r0001'"),
    "lora": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and REQUEST_ID.fullmatch(k)
                                                   and _is_lora_entry(k, e) for k, e in v.items()),
             "a map of request id -> {file: 'unlearning/lora/<request id>.safetensors', ...}"),
}


def check_saved_state(data: dict[str, Any], where: str) -> None:
    """Every field of ``unlearning/state.json`` has the form ``save_unlearned`` writes (LedgerError naming it)."""
    check_fields(data, _STATE_FIELDS, ("format", "base_fingerprint", "folded_fingerprint"), where, sep=": ")


def find_unlearned_folder(pipe: Any) -> Path | None:
    """The save_unlearned folder ``pipe`` was loaded from, if any: the ready classes record it; otherwise the path
    diffusers recorded in the pipeline's or the UNet's config (``_name_or_path``)."""
    candidates = [pipe.__dict__.get(FOLDER_ATTR)]
    config = getattr(pipe, "config", None)
    if config is not None and hasattr(config, "get"):
        candidates.append(config.get("_name_or_path"))
    unet_config = getattr(denoiser_of(pipe), "config", None)  # the UNet's or the transformer's
    if unet_config is not None and hasattr(unet_config, "get") and unet_config.get("_name_or_path"):
        candidates.append(Path(str(unet_config.get("_name_or_path"))).parent)
    for candidate in candidates:
        if candidate and isinstance(candidate, (str, os.PathLike)):
            path = Path(candidate)
            if (path / UNLEARNING_DIR / STATE_FILE).is_file():
                return path
    return None


def read_saved_unlearning(pipe: Any, current: dict[str, torch.Tensor]) -> SavedUnlearning | None:
    """The unlearning saved in the ``save_unlearned`` folder ``pipe`` was loaded from, or None for any other pipeline.

    ``current`` holds the UNet's K/V weights as loaded. They must be the folded weights the folder recorded
    (same fingerprint); then the base comes from ``unlearning/base_kv.safetensors`` and the ledger and adapters from
    ``unlearning/``. If the weights were changed after loading, None (with a warning): the current weights become a
    new base rather than silently treating a removal as part of the base.
    """
    folder = find_unlearned_folder(pipe)
    if folder is None:
        return None
    # the lock save_unlearned takes to switch the folder: every file below is read from the same folder
    with sibling_lock(folder, shared=True):
        return _read_saved_unlearning(folder, current)


def _read_saved_unlearning(folder: Path, current: dict[str, torch.Tensor]) -> SavedUnlearning | None:
    saved = read_saved_state(folder)
    if fingerprint(current) != saved["folded_fingerprint"]:
        warnings.warn(
            f"this pipeline was loaded from the unlearned folder {folder}, but its UNet K/V weights are not the folded "
            "weights saved there (changed after loading?); starting a new ledger with the current weights as the base",
            stacklevel=5,
        )
        return None
    ledger, artifacts = read_ledger_dir(folder / UNLEARNING_DIR, {name: tuple(t.shape) for name, t in current.items()})
    base = read_base_kv(folder / UNLEARNING_DIR / BASE_KV_FILE)
    where = str(folder / UNLEARNING_DIR)
    if sorted(base) != sorted(current):
        raise LedgerError(f"{where}/{BASE_KV_FILE} holds layers that do not match this UNet's K/V layers")
    for name, tensor in base.items():
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise LedgerError(f"{where}/{BASE_KV_FILE}: layer {name} has shape {tuple(tensor.shape)}, the UNet "
                              f"has {tuple(current[name].shape)}")
    if not fingerprint(base) == ledger.base_fingerprint == saved["base_fingerprint"]:
        raise LedgerError(f"{where}: the base weights, the ledger and {STATE_FILE} name different base fingerprints")
    if ledger.ids() != saved.get("requests", ledger.ids()):
        raise LedgerError(
            f"{where}: {LEDGER_FILE} lists requests {ledger.ids()} but the folded weights hold {saved.get('requests')} "
            "(changed after save_unlearned, e.g. by an interrupted `diffusers-unlearn run`?); rerun the plan or save "
            "the folder again"
        )
    shapes = {name: tuple(t.shape) for name, t in base.items()}
    for record in ledger.requests:
        check_adapter_fits(artifacts[record.request_id], shapes, f"{where}/{record.adapter['file']}")
    base = {name: tensor.to(device=current[name].device, dtype=current[name].dtype) for name, tensor in base.items()}
    logger.info("restored %d unlearning request(s) and the base K/V weights from %s", len(ledger.requests), folder)
    return SavedUnlearning(base, ledger, artifacts, {"folder": str(folder), "base_model": saved.get("base_model")})


def read_base_kv(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LedgerError(f"{path} is missing: the saved folder cannot restore its base weights")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != "diffusers-unlearn-base-kv":
                raise LedgerError(f"{path} is safetensors but not diffusers-unlearn base weights")
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if isinstance(err, LedgerError):
            raise
        raise LedgerError(f"{path} is not a valid safetensors file: {err}") from err
    for key, tensor in weights.items():
        if not tensor.is_floating_point() or tensor.dim() != 2 or not bool(torch.isfinite(tensor).all()):
            raise LedgerError(f"{path}: {key} must be a 2-D float tensor of finite values")
    return weights
