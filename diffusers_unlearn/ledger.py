"""The ledger: every removal request in order, with what it was and how it was made, plus its adapter on disk.

Layout of a ledger directory::

    ledger.json                 the ordered records (this module's LEDGER_FORMAT)
    adapters/<request_id>.safetensors   one artifact per request (factors or dense delta, float32)

Writes are atomic (temporary file in the same directory, fsync, rename); adapters are written before the ledger
that names them, so a crash leaves either the old or the new ledger, each with its files. Loading validates
everything (JSON schema, safetensors headers, checksums, base fingerprint) before anything is applied.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .adapters import RequestAdapter

LEDGER_FILE = "ledger.json"
ADAPTER_DIR = "adapters"
LEDGER_FORMAT = 1
ADAPTER_FORMAT = "diffusers-unlearn-adapter/1"
ADAPTER_METADATA_KEY = "diffusers_unlearn"


class LedgerError(ValueError):
    """A ledger directory or adapter file that cannot be used, with the reason and the path."""


@dataclass
class RequestRecord:
    """One removal request, as the ledger keeps it."""

    request_id: str
    index: int
    concept: str
    domain: str
    method: str
    method_config: dict[str, Any]
    strategy: dict[str, Any]
    regularizers: list[dict[str, Any]]
    adapter: dict[str, Any]  # kind, rank, alpha, file, sha256
    training: dict[str, Any]  # learning rate, batch size, ...
    prompts: list[str]
    steps: int
    seed: int
    seconds: float
    final_loss: float
    base_fingerprint: str
    library_version: str
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    timing: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    erasure: dict[str, Any] = field(default_factory=dict)  # the erasure check's figures ({}: ledgers made before it)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise LedgerError(f"request record is missing field(s) {missing}: {data.get('request_id', data)!r}")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Ledger:
    base_fingerprint: str
    requests: list[RequestRecord] = field(default_factory=list)
    next_index: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)

    def new_request_id(self) -> str:
        return f"r{self.next_index:04d}"

    def get(self, request_id: str) -> RequestRecord:
        for record in self.requests:
            if record.request_id == request_id:
                return record
        known = [r.request_id for r in self.requests] or "none"
        raise KeyError(f"no request {request_id!r} in the ledger; known request ids: {known}")

    def ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "base_fingerprint": self.base_fingerprint,
            "next_index": self.next_index,
            "requests": [r.to_dict() for r in self.requests],
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Ledger:
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{where} is not a diffusers-unlearn ledger (format {LEDGER_FORMAT})")
        try:
            requests = [RequestRecord.from_dict(r) for r in data["requests"]]
            ledger = cls(str(data["base_fingerprint"]), requests, int(data["next_index"]), list(data.get("history", [])))
        except (KeyError, TypeError, AttributeError) as err:
            raise LedgerError(f"{where} is corrupted: {err!r}") from err
        ids = ledger.ids()
        if len(set(ids)) != len(ids):
            raise LedgerError(f"{where} is corrupted: duplicate request ids in {ids}")
        return ledger


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_bytes(adapter: RequestAdapter, request_id: str) -> bytes:
    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make the bytes
    # (and the checksum in the ledger) differ from process to process for the same adapter.
    info = {"format": ADAPTER_FORMAT, "request_id": request_id, "kind": adapter.kind, "scales": adapter.scales}
    metadata = {ADAPTER_METADATA_KEY: json.dumps(info, sort_keys=True)}
    return st_save({k: v.contiguous() for k, v in adapter.tensors.items()}, metadata=metadata)


def read_adapter(path: Path, expected_sha256: str | None = None) -> RequestAdapter:
    """Read and check one adapter file (safetensors with our metadata, optional checksum)."""
    if not path.is_file():
        raise LedgerError(f"adapter file {path} is missing")
    data = path.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise LedgerError(f"adapter file {path} does not match the checksum in the ledger (changed or corrupted)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: {err}") from err
    try:
        info = json.loads(metadata[ADAPTER_METADATA_KEY])
        kind = info["kind"]
        scales = {k: float(v) for k, v in info["scales"].items()}
        fmt = info["format"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter ({err!r})") from err
    if fmt != ADAPTER_FORMAT or kind not in ("lora", "dense"):
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter")
    adapter = RequestAdapter(kind, {k: v.float() for k, v in tensors.items()}, scales)
    if adapter.kind == "lora" and set(scales) != set(adapter.layers):
        raise LedgerError(f"adapter file {path} has scales for {sorted(scales)} but layers {adapter.layers}")
    return adapter


def check_adapter_fits(adapter: RequestAdapter, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The artifact covers exactly the UNet's K/V layers, with matching shapes."""
    if sorted(adapter.layers) != sorted(shapes):
        raise LedgerError(
            f"{where} adapts layers that do not match this UNet's K/V layers "
            f"({len(adapter.layers)} in the file, {len(shapes)} in the UNet)"
        )
    for layer in adapter.layers:
        got = tuple(adapter.delta(layer).shape)
        if got != tuple(shapes[layer]):
            raise LedgerError(f"{where}: layer {layer} has shape {got}, the UNet has {tuple(shapes[layer])}")


def write_ledger_dir(directory: Path, ledger: Ledger, adapters: dict[str, RequestAdapter]) -> None:
    """Write adapters (each atomically), then the ledger, then remove adapter files no record names."""
    directory = Path(directory)
    adapter_dir = directory / ADAPTER_DIR
    for record in ledger.requests:
        data = adapter_bytes(adapters[record.request_id], record.request_id)
        record.adapter["file"] = f"{ADAPTER_DIR}/{record.request_id}.safetensors"
        record.adapter["sha256"] = sha256_bytes(data)
        atomic_write_bytes(directory / record.adapter["file"], data)
    atomic_write_bytes(directory / LEDGER_FILE, json.dumps(ledger.to_dict(), indent=2).encode())
    named = {directory / r.adapter["file"] for r in ledger.requests}
    if adapter_dir.is_dir():
        for stale in adapter_dir.glob("*.safetensors"):
            if stale not in named:
                stale.unlink()


def read_ledger_dir(directory: str | os.PathLike) -> tuple[Ledger, dict[str, RequestAdapter]]:
    """Read and validate a ledger directory; raise ``LedgerError`` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LedgerError(f"ledger directory {directory} does not exist")
    path = directory / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{directory} has no {LEDGER_FILE}: not a saved unlearning directory")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LedgerError(f"{path} is corrupted (not valid JSON): {err}") from err
    ledger = Ledger.from_dict(data, str(path))
    adapters = {}
    for record in ledger.requests:
        file = record.adapter.get("file")
        if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
            raise LedgerError(f"{path}: request {record.request_id} names an invalid adapter file {file!r}")
        adapters[record.request_id] = read_adapter(directory / file, record.adapter.get("sha256"))
    return ledger, adapters


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """A short hash of the base K/V weights (names, shapes, values rounded to float16).

    Rounding to float16 makes a float32 and a float16 load of the same checkpoint agree.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return "kv-" + digest.hexdigest()[:24]
