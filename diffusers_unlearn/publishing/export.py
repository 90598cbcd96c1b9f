"""Deployment: export requests as diffusers LoRA files, save a complete folded pipeline folder.

The folder's layout and reading it back are in ``saved_folder``.

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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from . import model_card
from ..kv import adapters as ad
from .._atomic import (
    atomic_write_bytes,
    fix_modes,
    folder_lock,
    remove_stale_staging,
    sibling_lock,
    staging_folder,
    switch_folder,
)
from .._validation import is_repo_id
from .._version import __version__
from ..families.registry import denoiser_of, family_of
from ..engine.ledger import LEDGER_FILE, fingerprint, write_ledger_dir
from ..engine.saved_folder import (  # noqa: F401 - the folder layout, also importable from here as before
    BASE_KV_FILE,
    CARD_FILE,
    FOLDER_ATTR,
    LORA_DIR,
    SAVED_FORMAT,
    STATE_FILE,
    UNLEARNING_DIR,
    check_unlearned_folder,
    find_unlearned_folder,
    read_base_kv,
    read_saved_state,
    saved_files,
)
from ..engine.state import find_state, rebuild, set_mode, unlearning_state

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------ LoRA export
def exact_factors(artifact: ad.RequestAdapter, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) with B @ A * scale equal to the layer's delta, of as small a rank as an exact form allows.

    LoRA artifacts keep their own factors. A dense (masked) delta D is written with one 0/1 selection factor: only
    the rows or the columns of D that hold a non-zero entry are kept, so the rank is min(non-zero rows, non-zero
    columns) <= min(out, in), and B @ A reproduces D bit for bit (each product is one entry of D times 1). A layer
    whose delta is all zeros gets rank 1 with zero factors (a LoRA cannot have rank 0).
    """
    if not artifact.dense_layer(layer):
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
    """What ``pipe.export_lora`` wrote for one request: a diffusers LoRA file, relative to the base model.

    Args:
        request_id: the exported request.
        path: the file written.
        weight_name: its file name, for ``load_lora_weights(directory, weight_name=...)``.
        kind: the artifact's kind, ``"lora"`` or ``"dense"`` (a dense delta is exported exactly, with a 0/1
            selection factor).
        ranks: the LoRA rank of each layer.
        bytes: the file's size.
    """

    request_id: str
    path: Path
    weight_name: str
    kind: str  # the artifact's kind: "lora" or "dense"
    ranks: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    @property
    def max_rank(self) -> int:
        """The largest rank over the layers."""
        return max(self.ranks.values())

    def to_dict(self) -> dict[str, Any]:
        """``kind``, ``weight_name``, ``max_rank``, ``min_rank`` and ``bytes``: the summary the model card lists."""
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


def _lora_saver(pipe: Any) -> tuple[type, str]:
    """The diffusers LoRA loader whose ``save_lora_weights`` writes the pipeline family's key layout ("unet." or
    "transformer." + module name), and the component name its keyword arguments start with."""
    import diffusers.loaders

    family = family_of(pipe)
    if family.name == "unet" and isinstance(pipe, StableDiffusionXLLoraLoaderMixin):
        return StableDiffusionXLLoraLoaderMixin, "unet"
    # Other UNet pipelines: the SD layout ("unet." + module name) is what every UNet LoRA loader reads.
    return getattr(diffusers.loaders, family.lora_loader), family.lora_component


def export_lora(
    pipe: Any, request_id: str, directory: str | os.PathLike, weight_name: str | None = None
) -> LoraExport:
    """Write one request's adapter in diffusers' LoRA format: ``pipe.load_lora_weights(directory,
    weight_name=...)`` on the BASE pipeline (without this package) then reproduces that request alone.

    Masked dense deltas (selective fine-tuning) are written as an exact LoRA of rank min(non-zero rows, non-zero
    columns) per layer, at most min(out, in): up to (out + in) / max(out, in) times the dense delta's size.
    """
    artifact = unlearning_state(pipe).artifact(request_id)
    weight_name = weight_name or f"{request_id}.safetensors"
    if not isinstance(weight_name, str) or "/" in weight_name or "\\" in weight_name or not weight_name.endswith(
        ".safetensors"
    ) or weight_name.startswith(".") or len(weight_name.encode("utf-8", "surrogatepass")) > 255 or any(
        ord(c) < 32 or ord(c) == 127 for c in weight_name
    ):
        raise ValueError(f"weight_name must be a plain file name ending in .safetensors (at most 255 bytes, not "
                         f"hidden, no control characters such as NUL), got {weight_name!r}"[:400])
    tensors, metadata, ranks = lora_state_dict(artifact)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saver, component = _lora_saver(pipe)
    saver.save_lora_weights(
        directory, weight_name=weight_name,
        **{f"{component}_lora_layers": tensors, f"{component}_lora_adapter_metadata": metadata},
    )
    path = directory / weight_name
    return LoraExport(request_id, path, weight_name, artifact.kind, ranks, path.stat().st_size)


# ----------------------------------------------------------------------------------------------- save_unlearned
def diffusers_class_name(pipe: Any) -> str:
    """Name of the diffusers pipeline class behind ``pipe`` (what model_index.json must name for plain diffusers)."""
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers_unlearn"):  # the mixins, and the classes attach() makes
            continue
        if cls.__module__.startswith("diffusers."):
            return cls.__name__
    raise TypeError(f"{type(pipe).__name__} is not a diffusers pipeline; save_unlearned needs one")


def fix_model_index(directory: Path, class_name: str) -> None:
    """Make model_index.json name the diffusers parent class (the ready classes' own name is unknown to diffusers)."""
    path = Path(directory) / "model_index.json"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not valid JSON (a diffusers model_index.json is a JSON map): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON map, got {type(data).__name__}")
    if data.get("_class_name") != class_name:
        data["_class_name"] = class_name
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_pretrained_folded(pipe: Any, directory: str | os.PathLike, save: Callable[[], None]) -> None:
    """Run diffusers' ``save`` with the denoiser folded when it carries the stacked requests, then put them back.

    Inside ``audit()`` (a partial set of adapters) this refuses rather than saving a state the ledger does not name.
    """
    state = find_state(pipe)
    if state is not None and state.auditing:
        raise ValueError(
            "save_pretrained inside audit() would save a partial set of requests; save outside the audit block "
            "(or export one request with export_lora)"
        )
    stacked = state is not None and any(isinstance(m, ad.LoraLayer) for m in denoiser_of(pipe).modules())
    if stacked:
        rebuild(pipe, mode="folded")
    started = time.time() - 1  # file system timestamps may be coarser than time.time()
    try:
        save()
    finally:
        if stacked:
            rebuild(pipe)
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
    state = find_state(pipe)
    origin = state.origin if state is not None else {}
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
    state = unlearning_state(pipe)
    directory = Path(directory)
    check_output_folder(directory)
    base_model = model_card.check_base_model(base_model) or guess_base_model(pipe)
    class_name = diffusers_class_name(pipe)
    tmp = staging_folder(directory)
    try:
        with folder_lock(tmp):  # held while it is written: a later save removes only staging folders nobody holds
            _write_unlearned(pipe, state, tmp, directory, base_model, class_name, evaluation)
    except SafetensorError as err:  # e.g. the disk is full: an OSError naming the folder, the old folder untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not save the unlearned pipeline to {directory}: {err}; the folder was left as it "
                      "was") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the unlearned pipeline (%d requests folded) to %s", len(state.ledger.requests), directory)
    return directory


def _write_unlearned(pipe: Any, state: Any, tmp: Path, directory: Path, base_model: str | None, class_name: str,
                     evaluation: dict[str, Any] | None) -> None:
    """Write the folder into the staging folder ``tmp`` and switch it in at ``directory`` (``save_unlearned``)."""
    previous = state.mode
    set_mode(pipe, "folded")  # plain nn.Linear layers holding base + all requests: what plain diffusers loads
    try:
        folded_fingerprint = fingerprint(ad.kv_weights(denoiser_of(pipe)))
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        if previous != "folded":
            set_mode(pipe, previous)
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
    card = model_card.build_model_card(
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
    # Readers of the folder (``read_saved_unlearning``) take the same lock, shared: they see the old folder
    # or the new one, never a switch in the middle of their reads.
    with sibling_lock(directory):
        remove_stale_staging(directory)  # what killed saves left beside it
        switch_folder(tmp, directory)



__all__ = [
    "LoraExport",
    "check_unlearned_folder",
    "diffusers_class_name",
    "exact_factors",
    "export_lora",
    "find_unlearned_folder",
    "guess_base_model",
    "lora_state_dict",
    "save_unlearned",
    "saved_files",
]
