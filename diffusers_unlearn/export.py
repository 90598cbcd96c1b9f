"""Deployment: export requests as diffusers LoRA files, save a complete folded pipeline folder, restore it.

Layout written by ``save_unlearned(directory)``::

    model_index.json, unet/, vae/, text_encoder/, ...   a plain diffusers pipeline; the UNet holds FOLDED weights
    README.md                                           model card (removed concepts, request table)
    unlearning/ledger.json, unlearning/adapters/        the ledger and one native artifact per request
    unlearning/lora/<request_id>.safetensors            each request in diffusers' LoRA format, relative to the BASE
    unlearning/base_kv.safetensors                      the true base K/V weights (the UNet only has folded ones)
    unlearning/state.json                               fingerprints and mode, written last

``DiffusionPipeline.from_pretrained(directory)`` loads it without this package. A pipeline with ``UnlearnMixin``
loaded from it (``du.attach`` or the ready classes) restores its base weights, ledger and adapters from
``unlearning/``, so audit, rollback and unfold work as on the pipeline that saved it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from . import __version__
from . import adapters as ad
from ._atomic import atomic_write_bytes, fix_modes, staging_folder, switch_folder
from ._validation import check_repo_id, is_repo_id
from .ledger import (
    LEDGER_FILE,
    REQUEST_ID,
    LedgerError,
    check_adapter_fits,
    fingerprint,
    parse_json,
    read_ledger_dir,
    write_ledger_dir,
)

if TYPE_CHECKING:
    from .mixin import UnlearningState

logger = logging.getLogger(__name__)

UNLEARNING_DIR = "unlearning"
LORA_DIR = "lora"
BASE_KV_FILE = "base_kv.safetensors"
STATE_FILE = "state.json"
CARD_FILE = "README.md"
SAVED_FORMAT = 1
FOLDER_ATTR = "_unlearned_folder"  # set by the ready classes' from_pretrained (Hub downloads land elsewhere)
ORIGIN_ATTR = "_unlearned_origin"  # where a restored state came from, and its base model id


# ------------------------------------------------------------------------------------------------ LoRA export
def exact_factors(artifact: ad.RequestAdapter, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) with B @ A * scale equal to the layer's delta, of as small a rank as an exact form allows.

    LoRA artifacts keep their own factors. A dense (masked) delta D is written with one 0/1 selection factor: only
    the rows or the columns of D that hold a non-zero entry are kept, so the rank is min(non-zero rows, non-zero
    columns) <= min(out, in), and B @ A reproduces D bit for bit (each product is one entry of D times 1). A layer
    whose delta is all zeros gets rank 1 with zero factors (a LoRA cannot have rank 0).
    """
    if artifact.kind == "lora":
        return artifact.lora_factors(layer)
    delta = artifact.tensors[f"{layer}.delta"]
    out_features, in_features = delta.shape
    rows = delta.ne(0).any(dim=1).nonzero().flatten()
    cols = delta.ne(0).any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return torch.zeros(1, in_features), torch.zeros(out_features, 1), 1.0
    if len(cols) <= len(rows):
        a = torch.zeros(len(cols), in_features, dtype=delta.dtype)
        a[torch.arange(len(cols)), cols] = 1.0
        return a, delta[:, cols].clone(), 1.0
    b = torch.zeros(out_features, len(rows), dtype=delta.dtype)
    b[rows, torch.arange(len(rows))] = 1.0
    return delta[rows].clone(), b, 1.0


@dataclass
class LoraExport:
    """What ``export_lora`` wrote for one request."""

    request_id: str
    path: Path
    weight_name: str
    kind: str  # the artifact's kind: "lora" or "dense"
    ranks: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight_name": self.weight_name, "max_rank": self.max_rank,
                "min_rank": min(self.ranks.values()), "bytes": self.bytes}


def lora_state_dict(artifact: ad.RequestAdapter) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
    """The artifact as diffusers/peft LoRA tensors (UNet module names, no prefix), its ``LoraConfig`` as a dict (the
    adapter metadata plain diffusers needs to rebuild the right per-layer rank and alpha) and the rank per layer."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for layer in artifact.layers:
        a, b, scale = exact_factors(artifact, layer)
        tensors[f"{layer}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{layer}.lora_B.weight"] = b.float().contiguous()
        ranks[layer] = int(a.shape[0])
        alphas[layer] = float(scale) * ranks[layer]  # peft's scale is alpha / r
    rank, _ = Counter(ranks.values()).most_common(1)[0]
    first = next(layer for layer in artifact.layers if ranks[layer] == rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=alphas[first],
        target_modules=list(artifact.layers),  # full module names: exactly these layers, SD or SDXL alike
        rank_pattern=dict(ranks),
        alpha_pattern=dict(alphas),
        init_lora_weights=True,
    )
    return tensors, _jsonable(config.to_dict()), ranks


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") else value  # str enums (peft_type, task_type)
    return str(value)


def _lora_saver(pipe: Any) -> type:
    """The diffusers class whose ``save_lora_weights`` matches the pipeline (SDXL or SD 1.x/2.x key layout)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    for cls in (StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin):
        if isinstance(pipe, cls):
            return cls
    # Other UNet pipelines: the SD layout ("unet." + module name) is what every UNet LoRA loader reads.
    return StableDiffusionLoraLoaderMixin


def export_lora(
    pipe: Any, request_id: str, directory: str | os.PathLike, weight_name: str | None = None
) -> LoraExport:
    """Write one request's adapter in diffusers' LoRA format: ``pipe.load_lora_weights(directory,
    weight_name=...)`` on the BASE pipeline (without this package) then reproduces that request alone.

    Masked dense deltas (selective fine-tuning) are written as an exact LoRA of rank min(non-zero rows, non-zero
    columns) per layer, at most min(out, in): up to (out + in) / max(out, in) times the dense delta's size.
    """
    pipe._check_request_id(request_id)
    artifact = pipe._unlearning().artifacts[request_id]
    weight_name = weight_name or f"{request_id}.safetensors"
    if not isinstance(weight_name, str) or "/" in weight_name or "\\" in weight_name or not weight_name.endswith(
        ".safetensors"
    ):
        raise ValueError(f"weight_name must be a plain file name ending in .safetensors, got {weight_name!r}")
    tensors, metadata, ranks = lora_state_dict(artifact)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _lora_saver(pipe).save_lora_weights(
        directory, unet_lora_layers=tensors, unet_lora_adapter_metadata=metadata, weight_name=weight_name
    )
    path = directory / weight_name
    return LoraExport(request_id, path, weight_name, artifact.kind, ranks, path.stat().st_size)


# ----------------------------------------------------------------------------------------------- save_unlearned
def diffusers_class_name(pipe: Any) -> str:
    """Name of the diffusers pipeline class behind ``pipe`` (what model_index.json must name for plain diffusers)."""
    from .mixin import UnlearnMixin

    for cls in type(pipe).__mro__:
        if cls is UnlearnMixin or cls.__module__.startswith("diffusers_unlearn"):
            continue
        if cls.__module__.startswith("diffusers."):
            return cls.__name__
    raise TypeError(f"{type(pipe).__name__} is not a diffusers pipeline; save_unlearned needs one")


def fix_model_index(directory: Path, class_name: str) -> None:
    """Make model_index.json name the diffusers parent class (the ready classes' own name is unknown to diffusers)."""
    path = Path(directory) / "model_index.json"
    data = json.loads(path.read_text())
    if data.get("_class_name") != class_name:
        data["_class_name"] = class_name
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_pretrained_folded(pipe: Any, directory: str | os.PathLike, save: Callable[[], None]) -> None:
    """Run diffusers' ``save`` with the UNet folded when it carries the stacked requests, then put them back.

    Inside ``audit()`` (a partial set of adapters) this refuses rather than saving a state the ledger does not name.
    """
    from .mixin import STATE_ATTR

    state = pipe.__dict__.get(STATE_ATTR)
    if state is not None and state.auditing:
        raise ValueError(
            "save_pretrained inside audit() would save a partial set of requests; save outside the audit block "
            "(or export one request with export_lora)"
        )
    stacked = state is not None and any(isinstance(m, ad.LoraLayer) for m in pipe.unet.modules())
    if stacked:
        pipe._rebuild(mode="folded")
    started = time.time() - 1  # file system timestamps may be coarser than time.time()
    try:
        save()
    finally:
        if stacked:
            pipe._rebuild()
    if Path(directory).is_dir():
        fix_modes(Path(directory), since=started)  # safetensors writes weights 0600
    if Path(directory, "model_index.json").is_file():
        fix_model_index(Path(directory), diffusers_class_name(pipe))


def is_hub_repo_id(value: object) -> bool:
    """True for strings shaped like a Hub model id ("user/model") that are not a local path."""
    return is_repo_id(value)


def guess_base_model(pipe: Any) -> str | None:
    """The Hub id of the model the unlearning started from, when it is known (a restored folder's record, or the
    id the pipeline was loaded from); None for local checkpoints and pipelines built in code."""
    origin = pipe.__dict__.get(ORIGIN_ATTR) or {}
    if origin.get("base_model"):
        return origin["base_model"]
    if origin:  # restored from a saved folder whose base model was not a Hub id
        return None
    name = pipe.config.get("_name_or_path") if hasattr(pipe, "config") else None
    return name if is_hub_repo_id(name) else None


def check_output_folder(directory: Path) -> None:
    """Refuse to replace a folder that is neither empty nor one this package wrote (never delete user files)."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / UNLEARNING_DIR / LEDGER_FILE).is_file():
        raise ValueError(
            f"{directory} is not empty and is not an unlearned pipeline folder (no {UNLEARNING_DIR}/{LEDGER_FILE}); "
            "choose a new or empty folder"
        )


def save_unlearned(
    pipe: Any,
    directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write a complete diffusers pipeline folder with every request of the ledger folded into the UNet.

    Everything is written to a new folder beside ``directory`` and switched in by one atomic exchange, so a crash
    at any point leaves the previous folder or the new one, complete. An existing ``directory`` is replaced only
    when it is empty or an unlearned pipeline folder. Files and folders get the umask's permissions (usually 0644
    and 0755). The pipeline's mode (stacked or folded) is the same afterwards.
    """
    from .model_card import build_model_card, check_base_model

    state = pipe._unlearning()
    directory = Path(directory)
    check_output_folder(directory)
    base_model = check_base_model(base_model) or guess_base_model(pipe)
    class_name = diffusers_class_name(pipe)
    tmp = staging_folder(directory)
    try:
        previous = state.mode
        pipe.fold()  # plain nn.Linear layers holding base + all requests: what plain diffusers must load
        try:
            folded_fingerprint = fingerprint(ad.kv_weights(pipe.unet))
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            if previous != "folded":
                pipe._set_mode(previous)
        fix_model_index(tmp, class_name)

        unlearning = tmp / UNLEARNING_DIR
        write_ledger_dir(unlearning, state.ledger, state.artifacts)
        base = {name: w.detach().to("cpu").contiguous() for name, w in state.base_weights.items()}
        atomic_write_bytes(
            unlearning / BASE_KV_FILE,
            st_save(base, metadata={"format": "diffusers-unlearn-base-kv", "base_fingerprint": state.base_fingerprint}),
        )
        exports = {}
        for request_id in state.ledger.ids():
            export = export_lora(pipe, request_id, unlearning / LORA_DIR)
            exports[request_id] = {**export.to_dict(), "file": f"{UNLEARNING_DIR}/{LORA_DIR}/{export.weight_name}"}
        card = build_model_card(
            state.ledger,
            base_model=base_model,
            pipeline_class=class_name,
            lora_exports=exports,
            evaluation=evaluation,
        )
        card.save(tmp / CARD_FILE)
        saved_state = {
            "format": SAVED_FORMAT,
            "library_version": __version__,
            "mode": "folded",
            "pipeline_class": class_name,
            "base_model": base_model,
            "base_fingerprint": state.base_fingerprint,
            "folded_fingerprint": folded_fingerprint,
            "requests": state.ledger.ids(),
            "lora": exports,
        }
        atomic_write_bytes(unlearning / STATE_FILE, (json.dumps(saved_state, indent=2) + "\n").encode())
        fix_modes(tmp)  # diffusers/transformers writers and tempfile leave some files 0600
        switch_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the unlearned pipeline (%d requests folded) to %s", len(state.ledger.requests), directory)
    return directory


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
    missing = [k for k in ("format", "base_fingerprint", "folded_fingerprint") if k not in data]
    if missing:
        raise LedgerError(f"{where} is missing field(s) {missing}")
    unknown = sorted(set(data) - set(_STATE_FIELDS))
    if unknown:
        raise LedgerError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(_STATE_FIELDS)}")
    for name, value in data.items():
        check, wanted = _STATE_FIELDS[name]
        if not check(value):
            raise LedgerError(f"{where}: {name} must be {wanted}, got {value!r}"[:400])


# ------------------------------------------------------------------------------------------------------ restore
def find_unlearned_folder(pipe: Any) -> Path | None:
    """The save_unlearned folder ``pipe`` was loaded from, if any: the ready classes record it; otherwise the path
    diffusers recorded in the pipeline's or the UNet's config (``_name_or_path``)."""
    candidates = [pipe.__dict__.get(FOLDER_ATTR)]
    config = getattr(pipe, "config", None)
    if config is not None and hasattr(config, "get"):
        candidates.append(config.get("_name_or_path"))
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    if unet_config is not None and hasattr(unet_config, "get") and unet_config.get("_name_or_path"):
        candidates.append(Path(str(unet_config.get("_name_or_path"))).parent)
    for candidate in candidates:
        if candidate and isinstance(candidate, (str, os.PathLike)):
            path = Path(candidate)
            if (path / UNLEARNING_DIR / STATE_FILE).is_file():
                return path
    return None


def restore_saved_state(pipe: Any, current: dict[str, torch.Tensor]) -> UnlearningState | None:
    """The unlearning state of a pipeline loaded from a ``save_unlearned`` folder, or None for any other pipeline.

    ``current`` holds the UNet's K/V weights as loaded. They must be the folded weights the folder recorded
    (same fingerprint); then the base comes from ``unlearning/base_kv.safetensors`` and the ledger and adapters from
    ``unlearning/``, in mode "folded". If the weights were changed after loading, the current weights become a new
    base (with a warning) rather than silently treating a removal as part of the base.
    """
    from .mixin import UnlearningState

    folder = find_unlearned_folder(pipe)
    if folder is None:
        return None
    saved = read_saved_state(folder)
    if fingerprint(current) != saved["folded_fingerprint"]:
        warnings.warn(
            f"this pipeline was loaded from the unlearned folder {folder}, but its UNet K/V weights are not the folded "
            "weights saved there (changed after loading?); starting a new ledger with the current weights as the base",
            stacklevel=4,
        )
        return None
    ledger, artifacts = read_ledger_dir(folder / UNLEARNING_DIR)
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
    object.__setattr__(pipe, ORIGIN_ATTR, {"folder": str(folder), "base_model": saved.get("base_model")})
    logger.info("restored %d unlearning request(s) and the base K/V weights from %s", len(ledger.requests), folder)
    return UnlearningState(
        base_weights=base, base_fingerprint=ledger.base_fingerprint, ledger=ledger, artifacts=artifacts, mode="folded"
    )


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


__all__ = [
    "LoraExport",
    "check_unlearned_folder",
    "diffusers_class_name",
    "exact_factors",
    "export_lora",
    "find_unlearned_folder",
    "guess_base_model",
    "lora_state_dict",
    "restore_saved_state",
    "save_unlearned",
    "saved_files",
]
