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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .._atomic import atomic_write_bytes, folder_lock, remove_stale_files
from .._validation import MAX_RANK, MAX_STEPS, SEED_MAX, check_int, check_number, finite_json_float, refuse_json_constant
from ..kv.adapters import RequestAdapter
from ..prompts import check_concept
from ..kv.merging import strategy_from_dict
from ..objectives import OBJECTIVES, build_objective_config, stored_method_config
from ..regularizers import REGULARIZERS, regularizer_from_dict, stored_regularizer_settings

LEDGER_FILE = "ledger.json"
ADAPTER_DIR = "adapters"
LEDGER_FORMAT = 1
ADAPTER_FORMAT = "diffusers-unlearn-adapter/1"
ADAPTER_METADATA_KEY = "diffusers_unlearn"
REQUEST_ID = re.compile(r"r[0-9]{4,9}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# adapters/<id>-<sha256 prefix>.safetensors, and adapters/<id>.safetensors as ledgers before content addressing
ADAPTER_FILE = re.compile(r"adapters/(r[0-9]{4,9})(-[0-9a-f]{16})?\.safetensors")
# Bounds of the one ledger schema, checked when a ledger is read AND before one is written (a save never writes
# what a load refuses).
INDEX_MAX = 999_999_999  # request ids are r + 4 to 9 digits: r0001 ... r999999999
RANK_MAX = MAX_RANK  # LoRA rank of one layer
SCALE_MAX = 1e6  # absolute LoRA scale (alpha / r) of one layer
SECONDS_MAX = 1e9  # recorded training time (about 30 years)
LEDGER_MAX_BYTES = 16 * 2**20  # ledger.json: thousands of requests fit; a larger file is refused before it is read
ADAPTER_HEADER_MAX_BYTES = 16 * 2**20  # the JSON header of one adapter file
ADAPTER_MAX_BYTES = 8 * 2**30  # one adapter file when the model's layer shapes are not known (else: exact shapes)
ADAPTER_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # safetensors dtypes an adapter may hold


class LedgerError(ValueError):
    """A ledger directory or adapter file that cannot be used, with the reason and the path.

    Raised on load before anything is applied (a field of the wrong type, a missing or tampered file, a ledger made
    on another base), and on save before anything is written when a value would not load back.
    """


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _accepted_by(validator: Callable[..., Any], **limits: Any) -> Callable[[Any], bool]:
    """A field check: whether ``validator`` (a ``_validation`` check) accepts the value within ``limits``."""
    def check(value: Any) -> bool:
        try:
            validator(value, "value", **limits)
        except ValueError:
            return False
        return True
    return check


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    """A field check: an integer in [low, high], as ``_validation.check_int`` decides."""
    return _accepted_by(check_int, minimum=low, maximum=high)


def _number_in(low: float | None, high: float | None) -> Callable[[Any], bool]:
    """A field check: a finite number in [low, high], as ``_validation.check_number`` decides."""
    return _accepted_by(check_number, minimum=low, maximum=high)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


CONCEPT_SEPARATOR = ", "
"""Between the concepts of a several-concept request in its label (``RequestRecord.concept``)."""


def concepts_label(concepts: Sequence[str]) -> str:
    """The one-line name of a request's concepts: the concept itself, or several joined by ``CONCEPT_SEPARATOR``.

    Args:
        concepts: the request's concepts, in order.

    Returns:
        The label, e.g. ``"van gogh, monet"``.

    Examples:
        >>> concepts_label(["van gogh"]), concepts_label(["van gogh", "monet"])
        ('van gogh', 'van gogh, monet')
    """
    return CONCEPT_SEPARATOR.join(concepts)


def check_request_concepts(value: Any, what: str = "concept") -> tuple[str, ...]:
    """The concepts one request removes: a string (one concept) or a non-empty list of distinct strings, each
    stripped; two that differ only in case or spacing are the same concept and are refused.

    Args:
        value: what the caller gave as the request's concept(s).
        what: how errors name the value.

    Returns:
        The concepts, stripped, in the given order (one for a string).

    Raises:
        TypeError: not a string nor a list or tuple of strings.
        ValueError: an empty string or list, or the same concept twice.

    Examples:
        >>> check_request_concepts(" van gogh "), check_request_concepts(["cat", "dog"])
        (('van gogh',), ('cat', 'dog'))
        >>> check_request_concepts(["cat", " Cat"])
        Traceback (most recent call last):
        ValueError: concept lists 'Cat' twice (case and spacing do not matter): ['cat', ' Cat']
    """
    if isinstance(value, str):
        return (check_concept(value, what),)
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}: {value!r}"[:400])
    if not value:
        raise ValueError(f"{what} must be a non-empty string or a non-empty list of strings, got {value!r}")
    out = tuple(check_concept(item, f"each {what}") for item in value)
    seen: set[str] = set()
    for item in out:
        norm = " ".join(item.lower().split())
        if norm in seen:
            raise ValueError(f"{what} lists {item!r} twice (case and spacing do not matter): {list(value)!r}"[:400])
        seen.add(norm)
    return out


def _is_concept_list(value: Any) -> bool:
    """A several-concept record's ``concepts``: at least two distinct non-empty strings, each stripped."""
    try:
        checked = check_request_concepts(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, list) and len(value) >= 2 and list(checked) == value


# field -> (check, what it must be); the checks a record's JSON passes before a RequestRecord is built
_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "request_id": (lambda v: isinstance(v, str) and bool(REQUEST_ID.fullmatch(v)), "a request id like 'r0001'"),
    "index": (_int_in(1, INDEX_MAX), f"an integer >= 1 (at most {INDEX_MAX})"),
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
    "steps": (_int_in(0, MAX_STEPS), f"an integer >= 0 (at most {MAX_STEPS})"),
    "seed": (_int_in(0, SEED_MAX), "an integer >= 0 (at most 2**63 - 1)"),
    "seconds": (_number_in(0, SECONDS_MAX), f"a number >= 0 (at most {SECONDS_MAX:g})"),
    "final_loss": (_is_number, "a finite number"),
    "base_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "library_version": (lambda v: isinstance(v, str), "a string"),
    "created_at": (lambda v: isinstance(v, str), "a string"),
    "timing": (lambda v: _is_dict(v) and all(_is_number(x) for x in v.values()), "a map of numbers"),
    "evaluation": (_is_dict, "a map"),
    "erasure": (_is_dict, "a map"),  # the erasure check's figures; absent in ledgers written before it
    # a several-concept request's concepts; absent for one concept (the record then is what it always was)
    "concepts": (_is_concept_list, "a list of at least 2 distinct non-empty strings (a one-concept record has none)"),
}
# fields a ledger written by an earlier version may lack (every other field is required); ``concepts`` is written
# only for a request of several concepts
_RECORD_OPTIONAL = ("erasure", "concepts")
_ADAPTER_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: v in ("lora", "dense"), "'lora' or 'dense'"),
    "file": (lambda v: isinstance(v, str) and bool(ADAPTER_FILE.fullmatch(v)),
             "'adapters/<request id>-<checksum prefix>.safetensors'"),
    "sha256": (lambda v: isinstance(v, str) and bool(SHA256.fullmatch(v)), "a sha256 checksum (64 hex digits)"),
    "ranks": (lambda v: isinstance(v, list) and all(_int_in(1, RANK_MAX)(r) for r in v),
              f"a list of integers in [1, {RANK_MAX}]"),
    "targets": (lambda v: _is_str_list(v) and all(t.strip() for t in v), "a list of non-empty strings"),
}
_ADAPTER_REQUIRED = ("kind", "file", "sha256")


def check_method_config(method: str, config: dict[str, Any], where: str) -> None:
    """``config`` is what the registered method ``method`` writes: its config class builds from it (unknown
    methods, unknown keys and wrong types are refused here, not at a later rollback)."""
    if method not in OBJECTIVES:
        raise LedgerError(f"{where[: -len('.method_config')]}.method {method!r} is not a registered method; "
                          f"registered: {sorted(OBJECTIVES)}")
    if config.get("method") != method:
        raise LedgerError(f"{where}.method must be the record's method {method!r}, got {config.get('method')!r}")
    try:
        build_objective_config(method, {k: v for k, v in config.items() if k != "method"})
    except (TypeError, ValueError) as err:
        raise LedgerError(f"{where} is not a valid {method!r} configuration: {err}"[:600]) from None


def check_regularizer_entries(method: str, entries: list[dict[str, Any]], where: str) -> None:
    """Each entry is a registered regularizer's settings (its class builds from them) plus its ``report`` map; an
    entry named after the record's method holds only that method's ``report`` (closed-form solves write one)."""
    for i, entry in enumerate(entries):
        report = entry.get("report", {})
        if not _is_dict(report):
            raise LedgerError(f"{where}[{i}].report must be a map, got {report!r}"[:400])
        settings = {k: v for k, v in entry.items() if k != "report"}
        if entry["name"] == method and entry["name"] not in REGULARIZERS:
            if set(settings) != {"name"}:
                raise LedgerError(f"{where}[{i}] (the {method!r} report) has unknown field(s) "
                                  f"{sorted(set(settings) - {'name'})}; allowed: ['name', 'report']")
            continue
        try:
            regularizer_from_dict(settings)
        except (TypeError, ValueError) as err:
            raise LedgerError(f"{where}[{i}] is not a valid regularizer: {err}"[:600]) from None


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


def _current_names(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A record's JSON with the option names an earlier version wrote (``preserve``, ``retain``, ...) replaced by the
    current ones, silently: the ledger is read as it was saved, and compares equal to requests made today."""
    try:
        return {**data, "method_config": stored_method_config(data["method"], data["method_config"]),
                "regularizers": [stored_regularizer_settings(entry) for entry in data["regularizers"]]}
    except TypeError as err:
        raise LedgerError(f"{where}: {err}"[:600]) from None


@dataclass
class RequestRecord:
    """One removal request, as the ledger keeps it: what was asked, how it was served, and where its adapter is.

    Records are written by ``pipe.unlearn`` (``pipe.unlearning_ledger.requests``); built from JSON they are checked
    field by field (:meth:`from_dict`).

    Attributes:
        request_id: ``"r0001"``, ``"r0002"``, ...: the request's index, zero-padded; never reused after a rollback.
        index: the number in ``request_id``.
        concept: the removed concept, as asked; for a request of several concepts their label (``concepts_label``:
            joined by ", "), so that everything that shows one line per request names all of them.
        domain: its prompt domain (``"style"``, ``"object"``, or a world's own).
        method: the registered erasure method that served it (``"closed_form"``, ``"esd"``, ``"ca"``, ...).
        method_config: that method's settings, as its config class writes them.
        strategy: how requests are composed (``{"strategy": "sequential"}``, or ``"merge"`` with a ``MergeStrategy``'s
            settings).
        regularizers: each regularizer's settings plus its ``report`` (what it measured while training).
        adapter: the artifact's kind, ranks and target layers, and its file name and sha256 once saved.
        training: the training settings (learning rate, batch size, ...).
        prompts: the prompts the request was trained or solved on.
        steps: the request's training steps.
        seed: the request's seed, for reproducibility.
        seconds: wall-clock time of the request.
        final_loss: the objective's last loss (0.0 for a solved method).
        base_fingerprint: fingerprint of the base K/V weights the request applies to.
        library_version: the diffusers-unlearn version that made it.
        created_at: UTC time of the request, ISO 8601.
        timing: seconds per phase (setup, the step loop, or the solve).
        evaluation: figures an evaluation attached to the request, if any.
        erasure: the erasure check's figures (``{}`` in ledgers made before the check existed).
        concepts: every concept the request removed, in order (a tuple; ``(concept,)`` for one concept). Stored in
            ``ledger.json`` only for several, so a one-concept record is written exactly as before it existed.
    """

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
    concepts: Sequence[str] = ()  # every concept removed; () is filled in as (concept,)

    def __post_init__(self) -> None:
        self.concepts = tuple(self.concepts) if self.concepts else (self.concept,)
        if len(self.concepts) > 1 and self.concept != concepts_label(self.concepts):
            raise LedgerError(f"a several-concept record's concept must be its concepts' label "
                              f"{concepts_label(self.concepts)!r}, got {self.concept!r}"[:400])

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON form (plain dicts and lists), as ``ledger.json`` stores it; ``concepts`` only for a
        request of several concepts."""
        data = dataclasses.asdict(self)
        if len(self.concepts) > 1:
            data["concepts"] = list(self.concepts)
        else:
            del data["concepts"]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "request record") -> RequestRecord:
        """Build a record from its JSON form, checking every field (all are required: nothing is filled in).

        Args:
            data: the record's JSON form (what :meth:`to_dict` wrote).
            where: how errors name the record, e.g. ``"ledger.json: requests[3]"``.

        Returns:
            The checked record.

        Raises:
            LedgerError: a missing, unknown or invalid field, naming its path.
        """
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
        if "concepts" in data and data["concept"] != concepts_label(data["concepts"]):
            raise LedgerError(f"{where}.concept must be the label of its concepts "
                              f"{concepts_label(data['concepts'])!r}, got {data['concept']!r}"[:400])
        data = _current_names(data, where)
        check_method_config(data["method"], data["method_config"], f"{where}.method_config")
        check_regularizer_entries(data["method"], data["regularizers"], f"{where}.regularizers")
        return cls(**data)


@dataclass
class Ledger:
    """Every removal request of a pipeline, in order, for one base model.

    The pipeline's ledger is ``pipe.unlearning_ledger``; ``save_unlearning`` writes it with the adapters.

    Args:
        base_fingerprint: fingerprint of the base K/V weights; a ledger refuses to load onto another base.
        requests: the active requests, in the order they were served.
        next_index: the index of the next request id (ids are never reused, even after a rollback).
        history: rollbacks, one map each (the request dropped, when, and what was re-solved).

    Examples:
        >>> ledger = Ledger("base-fingerprint")
        >>> ledger.new_request_id(), ledger.ids()
        ('r0001', [])
    """

    base_fingerprint: str
    requests: list[RequestRecord] = field(default_factory=list)
    next_index: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)

    def new_request_id(self) -> str:
        """The id the next request will get (``r`` and ``next_index``, zero-padded to 4 digits).

        Returns:
            The id, e.g. ``"r0003"``.

        Raises:
            LedgerError: the ledger is full (``next_index`` beyond ``INDEX_MAX``).
        """
        if not _int_in(1, INDEX_MAX)(self.next_index):
            raise LedgerError(f"the ledger is full: next_index {self.next_index!r} is beyond the last request index "
                              f"{INDEX_MAX} (request ids run from r0001 to r{INDEX_MAX}); start a new ledger")
        return f"r{self.next_index:04d}"

    def get(self, request_id: str) -> RequestRecord:
        """One request's record.

        Args:
            request_id: the request's id, e.g. ``"r0002"``.

        Returns:
            Its record.

        Raises:
            KeyError: no active request has that id (the message names the known ones).
        """
        for record in self.requests:
            if record.request_id == request_id:
                return record
        known = [r.request_id for r in self.requests] or "none"
        raise KeyError(f"no request {request_id!r} in the ledger; known request ids: {known}")

    def ids(self) -> list[str]:
        """The active requests' ids, in order."""
        return [r.request_id for r in self.requests]

    def to_dict(self) -> dict[str, Any]:
        """The ledger's JSON form, as ``ledger.json`` stores it (with its format number)."""
        return {
            "format": LEDGER_FORMAT,
            "base_fingerprint": self.base_fingerprint,
            "next_index": self.next_index,
            "requests": [r.to_dict() for r in self.requests],
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Ledger:
        """Build a ledger from its JSON form, checking every field and the records' consistency.

        Args:
            data: the JSON form (what :meth:`to_dict` wrote).
            where: how errors name the ledger, e.g. its file's path.

        Returns:
            The checked ledger.

        Raises:
            LedgerError: another format, an invalid field (named by its path), duplicate ids, indices out of
                order, a record of another base, or mixed composition strategies.
        """
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{where} is not a diffusers-unlearn ledger (format {LEDGER_FORMAT})")
        spec = {
            "format": (lambda v: True, ""),
            "base_fingerprint": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
            "next_index": (_int_in(1, INDEX_MAX + 1), f"an integer >= 1 (at most {INDEX_MAX + 1})"),
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
    suffixes = (".delta",) if adapter.kind == "dense" else (".lora_A", ".lora_B", ".delta")  # lora: dense layers too
    stray = [key for key in adapter.tensors if not key.endswith(suffixes)]
    if stray or not adapter.layers:
        raise LedgerError(f"{where}: a {adapter.kind} adapter holds unexpected tensors {sorted(stray)[:4]} or none")
    if adapter.kind == "lora":
        if set(adapter.scales) != set(adapter.layers):
            raise LedgerError(f"{where} has scales for {sorted(adapter.scales)} but layers {sorted(adapter.layers)}")
        for layer in adapter.layers:
            if adapter.dense_layer(layer):
                continue  # a dense delta: checked above (finite 2-D float), its shape against the model's on load
            a, b = adapter.tensors.get(f"{layer}.lora_A"), adapter.tensors.get(f"{layer}.lora_B")
            if a is None or b is None or a.shape[0] != b.shape[1]:
                raise LedgerError(f"{where}: layer {layer} has LoRA factors that do not fit together "
                                  f"(A {None if a is None else tuple(a.shape)}, B {None if b is None else tuple(b.shape)})")
            if a.shape[0] < 1:
                raise LedgerError(f"{where}: layer {layer} has LoRA factors of rank 0 (A {tuple(a.shape)}); a LoRA "
                                  f"rank must be in [1, {RANK_MAX}]")
            scale = adapter.scales[layer]
            if not (math.isfinite(scale) and abs(scale) <= SCALE_MAX):
                raise LedgerError(f"{where}: layer {layer} has scale {scale!r}; a scale must be a finite number in "
                                  f"[-{SCALE_MAX:g}, {SCALE_MAX:g}]")
            if not bool(torch.isfinite(adapter.delta(layer)).all()):
                raise LedgerError(f"{where}: layer {layer}'s change (B @ A * scale) overflows to non-finite values")
        if len(adapter.tensors) != sum(1 if adapter.dense_layer(layer) else 2 for layer in adapter.layers):
            raise LedgerError(f"{where}: a LoRA factor without its partner")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(object_pairs_hook=...)``: a key given twice in one object is refused (else the last one wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def read_safetensors_header(path: Path, shapes: dict[str, tuple[int, ...]] | None = None,
                            max_bytes: int = ADAPTER_MAX_BYTES, max_rank: int = RANK_MAX) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked before any tensor is read: the file's size (stat) against
    ``max_bytes``, the header's length, duplicate keys, every tensor's dtype, shape and byte range, and that the
    ranges cover the file exactly. With ``shapes`` (layer -> (out, in)), every tensor must be a ``.delta``,
    ``.lora_A`` or ``.lora_B`` of one of those layers with a shape that fits it (LoRA rank at least 1 and at most
    ``max_rank``, the record's declared rank, or the layer's full rank min(out, in) if larger), which bounds the
    file by the model's own size. Raises ``LedgerError``."""
    size = path.stat().st_size
    if size < 8 or size > max_bytes:
        raise LedgerError(f"adapter file {path}: size {size} bytes is outside [8, {max_bytes}] bytes")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length < 2 or length > min(ADAPTER_HEADER_MAX_BYTES, size - 8):
            raise LedgerError(f"adapter file {path} is not a valid safetensors file: header length {length} is outside [2, "
                              f"{min(ADAPTER_HEADER_MAX_BYTES, size - 8)}] bytes (not a safetensors file?)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates,
                            parse_constant=refuse_json_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: its header is not valid JSON: {err}"[:400]) from None
    if not isinstance(header, dict):
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: its header must be a map")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise LedgerError(f"adapter file {path} is not a valid safetensors file: header entry {key!r} must have dtype, shape and data_offsets"[:400])
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ADAPTER_DTYPES:
            raise LedgerError(f"adapter file {path}: tensor {key!r} has dtype {dtype!r}; allowed: "
                              f"{sorted(ADAPTER_DTYPES)}"[:400])
        if not (isinstance(shape, list) and len(shape) == 2 and all(_int_in(0, 2**31)(d) for d in shape)):
            raise LedgerError(f"adapter file {path}: tensor {key!r} has shape {shape!r}; a 2-D shape is required"[:400])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int_in(0, size)(o) for o in offsets)
                and offsets[1] - offsets[0] == shape[0] * shape[1] * ADAPTER_DTYPES[dtype]):
            raise LedgerError(f"adapter file {path} is not a valid safetensors file: tensor {key!r} has data_offsets {offsets!r} that do not fit its "
                              f"shape {shape} and dtype {dtype} within the file"[:400])
        if shapes is not None:
            layer, _, part = key.rpartition(".")
            if layer not in shapes or part not in ("delta", "lora_A", "lora_B"):
                raise LedgerError(f"adapter file {path}: tensor {key!r} is not an adapter tensor of one of this "
                                  f"model's {len(shapes)} K/V layers"[:400])
            out_features, in_features = shapes[layer]
            rank_cap = min(RANK_MAX, max(max_rank, min(out_features, in_features)))
            fits = {"delta": tuple(shape) == (out_features, in_features),
                    "lora_A": shape[1] == in_features and 1 <= shape[0] <= rank_cap,
                    "lora_B": shape[0] == out_features and 1 <= shape[1] <= rank_cap}
            if not fits[part]:
                wanted = {"delta": f"({out_features}, {in_features})", "lora_A": f"(rank, {in_features})",
                          "lora_B": f"({out_features}, rank)"}[part]
                raise LedgerError(f"adapter file {path}: tensor {key!r} has shape {tuple(shape)}, the UNet has "
                                  f"({out_features}, {in_features}) at that layer (so {wanted}, rank in [1, "
                                  f"{rank_cap}])"[:400])
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise LedgerError(f"adapter file {path} is not a valid safetensors file: tensor data ranges overlap or leave gaps")
        end = stop
    if 8 + length + end != size:
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: size {size} bytes, but its header describes {8 + length + end}")
    return header


def file_sha256(path: Path, chunk: int = 2**20) -> str:
    """The checksum of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter(path: Path, expected_sha256: str, request_id: str | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None, max_rank: int = RANK_MAX) -> RequestAdapter:
    """Read and check one adapter file: its size and safetensors header (before any tensor is read, against the
    model's layer ``shapes`` when given), its checksum (required), our metadata (never unpickled), finite values and
    consistent shapes."""
    if not isinstance(expected_sha256, str) or not SHA256.fullmatch(expected_sha256):
        raise LedgerError(f"adapter file {path}: a sha256 checksum is required, got {expected_sha256!r}")
    if not path.is_file():
        raise LedgerError(f"adapter file {path} is missing")
    try:
        read_safetensors_header(path, shapes, max_rank=max_rank)
        checksum = file_sha256(path)
    except OSError as err:
        raise LedgerError(f"adapter file {path} cannot be read: {err}") from None
    if checksum != expected_sha256:
        raise LedgerError(f"adapter file {path} does not match the checksum in the ledger (changed or corrupted)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise LedgerError(f"adapter file {path} is not a valid safetensors file: {err}") from err
    try:
        info = json.loads(metadata[ADAPTER_METADATA_KEY], parse_constant=refuse_json_constant,
                          parse_float=finite_json_float, object_pairs_hook=_reject_duplicates)
        kind = info["kind"]
        scales = {str(k): float(v) for k, v in info["scales"].items()}
        fmt = info["format"]
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter ({err!r})") from err
    if fmt != ADAPTER_FORMAT or kind not in ("lora", "dense"):
        raise LedgerError(f"adapter file {path} is safetensors but not a diffusers-unlearn adapter")
    if request_id is not None and info.get("request_id") != request_id:
        raise LedgerError(f"adapter file {path} belongs to request {info.get('request_id')!r}, not {request_id}")
    adapter = RequestAdapter(kind, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, scales)
    check_adapter_values(adapter, f"adapter file {path}")
    return adapter


def check_record_matches(record: RequestRecord, adapter: RequestAdapter, where: str) -> None:
    """The record's ``adapter`` fields say what its file holds: kind, ranks (LoRA ranks; none for a dense delta) and
    targets (the layer-name endings the file adapts)."""
    declared = record.adapter
    if declared.get("kind") != adapter.kind:
        raise LedgerError(f"{where}.adapter.kind is {declared.get('kind')!r} but the file holds a {adapter.kind!r} "
                          "adapter")
    if "ranks" in declared:
        ranks = sorted({int(t.shape[0]) for k, t in adapter.tensors.items() if k.endswith(".lora_A")})
        if sorted(declared["ranks"]) != ranks:
            raise LedgerError(f"{where}.adapter.ranks is {declared['ranks']!r} but the file's LoRA ranks are {ranks}")
    if "targets" in declared:
        targets = declared["targets"]

        def target_of(layer: str) -> str | None:
            return next((t for t in targets if layer == t or layer.endswith("." + t)), None)

        stray = sorted(layer for layer in adapter.layers if target_of(layer) is None)
        unused = sorted(set(targets) - {target_of(layer) for layer in adapter.layers})
        if stray or unused:
            raise LedgerError(f"{where}.adapter.targets {targets!r} do not match the file's layers (layers outside "
                              f"them: {stray[:3]}; targets without a layer: {unused})"[:600])


def check_adapter_fits(adapter: RequestAdapter, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The artifact covers exactly the UNet's K/V layers, with matching shapes."""
    if sorted(adapter.layers) != sorted(shapes):
        raise LedgerError(
            f"{where} adapts layers that do not match this UNet's K/V layers "
            f"({len(adapter.layers)} in the file, {len(shapes)} in the UNet)"
        )
    for layer in adapter.layers:
        out_features, in_features = shapes[layer]
        if adapter.dense_layer(layer):
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
    into one folder are serialised by a lock on the folder, so one of them wins whole; under it, temporaries that a
    killed save left behind are removed.

    Before anything is written, the ledger as it will be saved passes the same checks as a load (``Ledger.from_dict``,
    the size cap, each record against its adapter): a save never writes what a load refuses, and a request id
    that is not the library's form (``../x``) is refused before it names any path.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LedgerError(f"{directory} exists and is not a folder; save_unlearning needs a new or existing folder")
    where = f"{directory / LEDGER_FILE} (to be written)"
    for i, record in enumerate(ledger.requests):  # ids name files: check them before anything else
        request_id = getattr(record, "request_id", None)
        if not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
            raise LedgerError(f"{where}: requests[{i}].request_id must be a request id like 'r0001', got "
                              f"{request_id!r}"[:400])
        if request_id not in adapters:
            raise LedgerError(f"{where}: requests[{i}] ({request_id}) has no adapter")
    records = []
    files = {}
    for record in ledger.requests:
        data = adapter_bytes(adapters[record.request_id], record.request_id)
        checksum = sha256_bytes(data)
        records.append((record, adapter_file_name(record.request_id, checksum), checksum))
        files[adapter_file_name(record.request_id, checksum)] = data
    saved = ledger.to_dict()
    for entry, (_, name, checksum) in zip(saved["requests"], records):
        entry["adapter"] = {**entry["adapter"], "file": name, "sha256": checksum}
    try:
        text = json.dumps(saved, indent=2, allow_nan=False).encode()
    except (TypeError, ValueError) as err:  # a non-finite number or an object that is not JSON
        raise LedgerError(f"{where}: the ledger holds a value JSON cannot store as a number or text: {err}") from None
    checked = Ledger.from_dict(parse_json(text.decode(), where), where)
    for record, (_, name, _) in zip(checked.requests, records):
        check_record_matches(record, adapters[record.request_id], f"{where}: request {record.request_id}")
    if len(text) > LEDGER_MAX_BYTES:
        raise LedgerError(f"{where}: {len(text)} bytes, more than the {LEDGER_MAX_BYTES} bytes a ledger may have")
    directory.mkdir(parents=True, exist_ok=True)
    adapter_dir = directory / ADAPTER_DIR
    for path in (adapter_dir, directory / LEDGER_FILE):
        if path.is_symlink():  # a planted link would make the save write outside the folder
            raise LedgerError(f"{path} is a symbolic link; refusing to save through it")
    with folder_lock(directory):
        remove_stale_files(directory)
        remove_stale_files(adapter_dir)
        for name, data in files.items():
            path = directory / name
            if not (path.is_file() and path.stat().st_size == len(data) and file_sha256(path) == sha256_bytes(data)):
                atomic_write_bytes(path, data)
        for record, name, checksum in records:
            record.adapter["file"], record.adapter["sha256"] = name, checksum
        atomic_write_bytes(directory / LEDGER_FILE, text)
        if adapter_dir.is_dir():
            for stale in adapter_dir.iterdir():
                if stale.is_file() and ADAPTER_FILE.fullmatch(f"{ADAPTER_DIR}/{stale.name}") and \
                        f"{ADAPTER_DIR}/{stale.name}" not in files:
                    stale.unlink()


def parse_json(text: str, where: str) -> Any:
    """JSON as the library writes it: NaN, Infinity, numbers that overflow a float and keys given twice in one
    object are refused."""
    try:
        return json.loads(text, parse_constant=refuse_json_constant, parse_float=finite_json_float,
                          object_pairs_hook=_reject_duplicates)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise LedgerError(f"{where} is corrupted (not valid JSON as this library writes it): {err}") from None


def read_ledger_dir(
    directory: str | os.PathLike, shapes: dict[str, tuple[int, ...]] | None = None,
    check: Callable[[Ledger], None] | None = None,
) -> tuple[Ledger, dict[str, RequestAdapter]]:
    """Read and validate a ledger directory; raise ``LedgerError`` naming the file and what is wrong.

    ``shapes`` (layer -> (out, in) of the model it is for) bounds every adapter file by the model's layer shapes and
    the record's declared ranks, checked from the file's header before any tensor is read. ``check`` sees the
    validated ledger before any adapter file is opened (e.g. to refuse another base model's ledger first).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LedgerError(f"ledger directory {directory} does not exist")
    path = directory / LEDGER_FILE
    if not path.is_file():
        raise LedgerError(f"{directory} has no {LEDGER_FILE}: not a saved unlearning directory")
    with folder_lock(directory, shared=True):  # a concurrent save cannot remove the files this ledger names
        try:
            size = path.stat().st_size
            if size > LEDGER_MAX_BYTES:
                raise LedgerError(f"{path}: size {size} bytes is more than the {LEDGER_MAX_BYTES} bytes a ledger "
                                  "may have")
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise LedgerError(f"{path} is corrupted (not UTF-8 text): {err}") from None
        except OSError as err:
            raise LedgerError(f"{path} cannot be read: {err}") from None
        ledger = Ledger.from_dict(parse_json(text, str(path)), str(path))
        if check is not None:
            check(ledger)
        adapters = {}
        for i, record in enumerate(ledger.requests):
            # the name matched ADAPTER_FILE: it lies in adapters/ of this folder, whatever the ledger says
            ranks = record.adapter.get("ranks") or [RANK_MAX]
            adapters[record.request_id] = read_adapter(
                directory / record.adapter["file"], record.adapter["sha256"], record.request_id, shapes,
                max_rank=max(ranks),
            )
            check_record_matches(record, adapters[record.request_id], f"{path}: requests[{i}]")
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
