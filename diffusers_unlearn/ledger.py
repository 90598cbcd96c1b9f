"""The ledger: every removal request in order, with what it was and how it was made, plus its adapter on disk.

Layout of a ledger directory::

    ledger.json                                   the ordered records (this module's LEDGER_FORMAT)
    adapters/<request_id>-<sha256[:16]>.safetensors   one artifact per request (factors or dense delta, float32)

Saves are atomic as a whole: adapter files are named by their content, so a save never overwrites a file the
previous ledger names; the new ``ledger.json`` is switched in by one rename, and only then are files that no
record names removed. A crash at any point leaves the old ledger or the new one, each with all its files.

Loading trusts nothing: the JSON is checked field by field (a ``LedgerError`` names the field's path), request
ids and file names must have the form this module writes (nothing outside the folder can be named), checksums
are required, safetensors files are read without unpickling anything, and adapters with non-finite values or
inconsistent shapes are refused, all before anything is applied.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from ._atomic import atomic_write_bytes, folder_lock
from ._validation import finite_json_float, refuse_json_constant
from .adapters import RequestAdapter
from .merging import strategy_from_dict

LEDGER_FILE = "ledger.json"
ADAPTER_DIR = "adapters"
LEDGER_FORMAT = 1
ADAPTER_FORMAT = "diffusers-unlearn-adapter/1"
ADAPTER_METADATA_KEY = "diffusers_unlearn"
REQUEST_ID = re.compile(r"r[0-9]{4,9}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# adapters/<id>-<sha256 prefix>.safetensors, and adapters/<id>.safetensors as ledgers before content addressing
ADAPTER_FILE = re.compile(r"adapters/(r[0-9]{4,9})(-[0-9a-f]{16})?\.safetensors")


class LedgerError(ValueError):
    """A ledger directory or adapter file that cannot be used, with the reason and the path."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


# field -> (check, what it must be); the checks a record's JSON passes before a RequestRecord is built
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "request_id": (lambda v: isinstance(v, str) and bool(REQUEST_ID.fullmatch(v)), "a request id like 'r0001'"),
    "index": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "concept": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "domain": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "method": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "method_config": (_is_dict, "a map"),
    "strategy": (_is_dict, "a map"),
    "regularizers": (lambda v: isinstance(v, list) and all(_is_dict(r) and isinstance(r.get("name"), str) for r in v),
                     "a list of maps with a 'name'"),
    "adapter": (_is_dict, "a map"),
    "training": (_is_dict, "a map"),
    "prompts": (lambda v: _is_str_list(v) and bool(v), "a non-empty list of strings"),
    "steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "seconds": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "final_loss": (_is_number, "a finite number"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "library_version": (lambda v: isinstance(v, str), "a string"),
    "created_at": (lambda v: isinstance(v, str), "a string"),
    "timing": (lambda v: _is_dict(v) and all(_is_number(x) for x in v.values()), "a map of numbers"),
    "evaluation": (_is_dict, "a map"),
    "erasure": (_is_dict, "a map"),  # the erasure check's figures; absent in ledgers written before it
}
# fields a ledger written by an earlier version may lack (every other field is required)
_RECORD_OPTIONAL = ("erasure",)
_ADAPTER_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: v in ("lora", "dense"), "'lora' or 'dense'"),
    "file": (lambda v: isinstance(v, str) and bool(ADAPTER_FILE.fullmatch(v)),
             "'adapters/<request id>-<checksum prefix>.safetensors'"),
    "sha256": (lambda v: isinstance(v, str) and bool(SHA256.fullmatch(v)), "a sha256 checksum (64 hex digits)"),
    "ranks": (lambda v: isinstance(v, list) and all(_is_int(r) and r >= 1 for r in v), "a list of integers >= 1"),
    "targets": (_is_str_list, "a list of strings"),
}
_ADAPTER_REQUIRED = ("kind", "file", "sha256")


def check_fields(
    data: dict[str, Any], spec: dict[str, tuple[Callable[[Any], bool], str]], required: Any, where: str,
    sep: str = ".",
) -> None:
    """Refuse missing, unknown and malformed fields of a JSON map; the error names ``where`` + sep + the field."""
    missing = [name for name in required if name not in data]
    if missing:
        raise LedgerError(f"{where} is missing field(s) {missing}")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise LedgerError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(spec)}")
    for name, value in data.items():
        check, wanted = spec[name]
        if not check(value):
            raise LedgerError(f"{where}{sep}{name} must be {wanted}, got {value!r}"[:400])


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
    def from_dict(cls, data: Any, where: str = "request record") -> RequestRecord:
        """Build a record from its JSON form, checking every field; ``where`` names it in errors."""
        if not _is_dict(data):
            raise LedgerError(f"{where} must be a map, got {type(data).__name__}")
        # every field is required: the library writes them all, and a loader that filled in defaults would
        # silently hold something other than what the file says
        check_fields(data, _RECORD_FIELDS, [f for f in _RECORD_FIELDS if f not in _RECORD_OPTIONAL], where)
        request_id = data["request_id"]
        if request_id != f"r{data['index']:04d}":
            raise LedgerError(f"{where}.request_id {request_id!r} does not match its index {data['index']} "
                              f"(the ledger writes 'r{data['index']:04d}')")
        check_fields(data["adapter"], _ADAPTER_FIELDS, _ADAPTER_REQUIRED, f"{where}.adapter")
        if ADAPTER_FILE.fullmatch(data["adapter"]["file"]).group(1) != request_id:
            raise LedgerError(f"{where}.adapter.file {data['adapter']['file']!r} is not request {request_id}'s file")
        try:
            strategy_from_dict(data["strategy"])
        except (TypeError, ValueError) as err:
            raise LedgerError(f"{where}.strategy is invalid: {err}") from None
        return cls(**data)


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
        """Build a ledger from its JSON form, checking every field; errors name ``where`` and the field's path."""
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{where} is not a diffusers-unlearn ledger (format {LEDGER_FORMAT})")
        spec = {
            "format": (lambda v: True, ""),
            "base_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
            "next_index": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            "requests": (lambda v: isinstance(v, list), "a list"),
            "history": (lambda v: isinstance(v, list) and all(_is_dict(e) for e in v), "a list of maps"),
        }
        check_fields(data, spec, list(spec), where, sep=": ")
        requests = [RequestRecord.from_dict(r, f"{where}: requests[{i}]") for i, r in enumerate(data["requests"])]
        ledger = cls(data["base_fingerprint"], requests, data["next_index"], list(data["history"]))
        ids = ledger.ids()
        if len(set(ids)) != len(ids):
            raise LedgerError(f"{where} is corrupted: duplicate request ids in {ids}")
        indices = [r.index for r in requests]
        if indices != sorted(indices) or (indices and ledger.next_index <= indices[-1]):
            raise LedgerError(f"{where} is corrupted: request indices {indices} are not increasing and below "
                              f"next_index {ledger.next_index}")
        for i, record in enumerate(requests):
            if record.base_fingerprint != ledger.base_fingerprint:
                raise LedgerError(f"{where}: requests[{i}].base_fingerprint {record.base_fingerprint!r} is not the "
                                  f"ledger's {ledger.base_fingerprint!r}")
        strategies = {json.dumps(r.strategy, sort_keys=True) for r in requests}
        if len(strategies) > 1:
            raise LedgerError(f"{where} mixes composition strategies {sorted(strategies)}")
        return ledger


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def adapter_file_name(request_id: str, sha256: str) -> str:
    """Where a request's adapter lives in a ledger folder: named by its id and content, so a save never
    overwrites a file that the previous ``ledger.json`` names with other bytes."""
    return f"{ADAPTER_DIR}/{request_id}-{sha256[:16]}.safetensors"


def adapter_bytes(adapter: RequestAdapter, request_id: str) -> bytes:
    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make the bytes
    # (and the checksum in the ledger) differ from process to process for the same adapter.
    info = {"format": ADAPTER_FORMAT, "request_id": request_id, "kind": adapter.kind, "scales": adapter.scales}
    metadata = {ADAPTER_METADATA_KEY: json.dumps(info, sort_keys=True)}
    return st_save({k: v.contiguous() for k, v in adapter.tensors.items()}, metadata=metadata)


def check_adapter_values(adapter: RequestAdapter, where: str) -> None:
    """Every tensor is a finite float matrix, the factors of each layer fit together, every scale is finite.

    A NaN or Inf in one adapter would poison every image the pipeline makes; a factor of the wrong shape would
    fail deep inside torch.
    """
    for key, tensor in adapter.tensors.items():
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise LedgerError(f"{where}: tensor {key} must be a 2-D float tensor, got {tensor.dtype} "
                              f"{tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise LedgerError(f"{where}: tensor {key} holds non-finite values (NaN or Inf)")
    suffixes = (".delta",) if adapter.kind == "dense" else (".lora_A", ".lora_B")
    stray = [key for key in adapter.tensors if not key.endswith(suffixes)]
    if stray or not adapter.layers:
        raise LedgerError(f"{where}: a {adapter.kind} adapter holds unexpected tensors {sorted(stray)[:4]} or none")
    if adapter.kind == "lora":
        if set(adapter.scales) != set(adapter.layers):
            raise LedgerError(f"{where} has scales for {sorted(adapter.scales)} but layers {sorted(adapter.layers)}")
        for layer in adapter.layers:
            a, b = adapter.tensors.get(f"{layer}.lora_A"), adapter.tensors.get(f"{layer}.lora_B")
            if a is None or b is None or a.shape[0] != b.shape[1]:
                raise LedgerError(f"{where}: layer {layer} has LoRA factors that do not fit together "
                                  f"(A {None if a is None else tuple(a.shape)}, B {None if b is None else tuple(b.shape)})")
            if not math.isfinite(adapter.scales[layer]):
                raise LedgerError(f"{where}: layer {layer} has a non-finite scale {adapter.scales[layer]}")
        if len(adapter.tensors) != 2 * len(adapter.layers):
            raise LedgerError(f"{where}: a LoRA factor without its partner")


def read_adapter(path: Path, expected_sha256: str, request_id: str | None = None) -> RequestAdapter:
    """Read and check one adapter file: its checksum (required), safetensors with our metadata (never
    unpickled), finite values and consistent shapes."""
    if not isinstance(expected_sha256, str) or not SHA256.fullmatch(expected_sha256):
        raise LedgerError(f"adapter file {path}: a sha256 checksum is required, got {expected_sha256!r}")
    if not path.is_file():
        raise LedgerError(f"adapter file {path} is missing")
    data = path.read_bytes()
    if sha256_bytes(data) != expected_sha256:
        raise LedgerError(f"adapter file {path} does not match the checksum in the ledger (changed or corrupted)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: {err}") from err
    try:
        info = json.loads(metadata[ADAPTER_METADATA_KEY], parse_constant=refuse_json_constant,
                          parse_float=finite_json_float)
        kind = info["kind"]
        scales = {str(k): float(v) for k, v in info["scales"].items()}
        fmt = info["format"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter ({err!r})") from err
    if fmt != ADAPTER_FORMAT or kind not in ("lora", "dense"):
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter")
    if request_id is not None and info.get("request_id") != request_id:
        raise LedgerError(f"adapter file {path} belongs to request {info.get('request_id')!r}, not {request_id}")
    adapter = RequestAdapter(kind, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, scales)
    check_adapter_values(adapter, f"adapter file {path}")
    return adapter


def check_adapter_fits(adapter: RequestAdapter, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The artifact covers exactly the UNet's K/V layers, with matching shapes."""
    if sorted(adapter.layers) != sorted(shapes):
        raise LedgerError(
            f"{where} adapts layers that do not match this UNet's K/V layers "
            f"({len(adapter.layers)} in the file, {len(shapes)} in the UNet)"
        )
    for layer in adapter.layers:
        out_features, in_features = shapes[layer]
        if adapter.kind == "dense":
            got = tuple(adapter.tensors[f"{layer}.delta"].shape)
        else:  # factor shapes, checked before any product: a wrong one would fail inside torch
            a, b = adapter.tensors[f"{layer}.lora_A"], adapter.tensors[f"{layer}.lora_B"]
            got = (b.shape[0], a.shape[1])
        if got != (out_features, in_features):
            raise LedgerError(f"{where}: layer {layer} has shape {got}, the UNet has {tuple(shapes[layer])}")


def write_ledger_dir(directory: str | os.PathLike, ledger: Ledger, adapters: dict[str, RequestAdapter]) -> None:
    """Save the ledger and its adapters so that a crash at any point leaves the old or the new ledger, complete.

    Adapters go to content-addressed names (never over a file the old ledger names with other bytes), then
    ``ledger.json`` is replaced in one rename, then adapter files no record names are removed. Concurrent savers
    into one folder are serialised by a lock on the folder, so one of them wins whole.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter_dir = directory / ADAPTER_DIR
    for path in (adapter_dir, directory / LEDGER_FILE):
        if path.is_symlink():  # a planted link would make the save write outside the folder
            raise LedgerError(f"{path} is a symbolic link; refusing to save through it")
    records = []
    files = {}
    for record in ledger.requests:
        data = adapter_bytes(adapters[record.request_id], record.request_id)
        checksum = sha256_bytes(data)
        records.append((record, adapter_file_name(record.request_id, checksum), checksum))
        files[adapter_file_name(record.request_id, checksum)] = data
    with folder_lock(directory):
        for name, data in files.items():
            path = directory / name
            if not (path.is_file() and sha256_bytes(path.read_bytes()) == sha256_bytes(data)):
                atomic_write_bytes(path, data)
        for record, name, checksum in records:
            record.adapter["file"], record.adapter["sha256"] = name, checksum
        atomic_write_bytes(directory / LEDGER_FILE, json.dumps(ledger.to_dict(), indent=2).encode())
        if adapter_dir.is_dir():
            for stale in adapter_dir.iterdir():
                if stale.is_file() and ADAPTER_FILE.fullmatch(f"{ADAPTER_DIR}/{stale.name}") and \
                        f"{ADAPTER_DIR}/{stale.name}" not in files:
                    stale.unlink()


def parse_json(text: str, where: str) -> Any:
    """JSON as the library writes it: NaN, Infinity and numbers that overflow a float are refused."""
    try:
        return json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise LedgerError(f"{where} is corrupted (not valid JSON as this library writes it): {err}") from None


def read_ledger_dir(directory: str | os.PathLike) -> tuple[Ledger, dict[str, RequestAdapter]]:
    """Read and validate a ledger directory; raise ``LedgerError`` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LedgerError(f"ledger directory {directory} does not exist")
    path = directory / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{directory} has no {LEDGER_FILE}: not a saved unlearning directory")
    with folder_lock(directory, shared=True):  # a concurrent save cannot remove the files this ledger names
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise LedgerError(f"{path} is corrupted (not UTF-8 text): {err}") from None
        ledger = Ledger.from_dict(parse_json(text, str(path)), str(path))
        adapters = {}
        for record in ledger.requests:
            # the name matched ADAPTER_FILE: it lies in adapters/ of this folder, whatever the ledger says
            adapters[record.request_id] = read_adapter(
                directory / record.adapter["file"], record.adapter["sha256"], record.request_id
            )
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
