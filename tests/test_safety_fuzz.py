"""Fuzz the loaders with mutated ledgers, adapter files, state files and plan files (a seeded generator, a few
hundred cases in all, CI-sized).

Mutations: truncation, bit flips, type swaps, missing keys, extra keys, huge and non-finite numbers (and, for
adapters, non-finite values, wrong shapes and dtypes, dropped or extra tensors, broken metadata). Every mutation
gives the package's own error with the pipeline unchanged, or loads exactly what the file says (a ledger equal to
the file's JSON, adapters equal to the file's tensors): nothing is dropped, defaulted or coerced silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAST, kv_state
from diffusers import DiffusionPipeline
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import diffusers_unlearn as du
from diffusers_unlearn.engine.saved_folder import STATE_FILE, UNLEARNING_DIR, read_saved_state, read_saved_unlearning
from diffusers_unlearn.engine.ledger import LedgerError
from diffusers_unlearn.plan import PlanError, load_plan

HUGE = "1e400"  # overflows a float: written into the text raw
SWAPS = [None, True, False, 0, -1, 7, 2.5, -0.0, 1e308, 10**30, 2**64, "", "x", "r0001", "../x", [], {}, [1],
         {"a": 1}, ["adapters/r0001.safetensors"]]


def _paths(value, prefix=()):
    """Every path into a JSON-like value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def mutate_json(data, rng: random.Random) -> str:
    """A JSON text: ``data`` with one structural mutation, or its text truncated or with a bit flipped."""
    data = json.loads(json.dumps(data))
    kind = rng.choice(["delete", "extra", "swap", "swap", "number", "truncate", "flip", "flip"])
    if kind in ("truncate", "flip"):
        raw = bytearray(json.dumps(data, indent=2).encode())
        if kind == "truncate":
            return raw[: rng.randrange(len(raw))].decode("utf-8", "replace")
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        return raw.decode("utf-8", "replace")
    paths = [p for p in _paths(data) if p]
    path = rng.choice(paths)
    parent, key = _get(data, path[:-1]), path[-1]
    if kind == "delete":
        del parent[key]
    elif kind == "extra":
        target = parent if isinstance(parent, dict) else _get(data, path) if isinstance(_get(data, path), dict) else data
        target[f"extra_{rng.randrange(100)}"] = rng.choice(SWAPS)
    elif kind == "swap":
        parent[key] = rng.choice(SWAPS)
    else:
        numbers = [p for p in paths if isinstance(_get(data, p), (int, float)) and not isinstance(_get(data, p), bool)]
        path = rng.choice(numbers or paths)
        _get(data, path[:-1])[path[-1]] = rng.choice([float("nan"), float("inf"), float("-inf"), HUGE, 1e308,
                                                      -(10**30), 2**70])
    return json.dumps(data, indent=2).replace(f'"{HUGE}"', HUGE)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    pipe.unlearn("dog", domain="object", seed=1, **FAST)
    root = tmp_path_factory.mktemp("fuzz")
    pipe.save_unlearning(root / "ledger")
    pipe.save_unlearned(root / "folder")
    return pipe, root


def _target_pipe():
    """A pipeline holding nothing, folded (so a load rebuilds only plain weights: fast)."""
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.fold()
    return pipe


def _check_load(pipe, folder: Path, before: dict, outcomes: list) -> None:
    """load_unlearning refuses with LedgerError and changes nothing, or holds exactly what the folder says."""
    try:
        pipe.load_unlearning(folder, replace=True)
    except LedgerError:
        after = kv_state(pipe)
        assert pipe.unlearning_ledger.ids() == [] and all(torch.equal(after[k], before[k]) for k in before)
        outcomes.append("refused")
        return
    data = json.loads((folder / "ledger.json").read_text())
    assert pipe.unlearning_ledger.to_dict() == data
    for record in data["requests"]:
        file_tensors = st_load((folder / record["adapter"]["file"]).read_bytes())
        loaded = pipe.request_adapter(record["request_id"]).tensors
        assert loaded.keys() == file_tensors.keys()
        assert all(torch.equal(loaded[k], file_tensors[k].float()) for k in loaded)
    outcomes.append("loaded")
    pipe.load_unlearning(folder.parent / "empty", replace=True)  # back to no requests, for the next case


def _empty_ledger(folder: Path, fingerprint: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "ledger.json").write_text(json.dumps({"format": 1, "base_fingerprint": fingerprint, "next_index": 1,
                                                    "requests": [], "history": []}))


def _fuzz_setup(original, tmp_path: Path) -> tuple[Path, dict, Any, dict]:
    """(saved root, its ledger's JSON, a fresh target pipeline, its K/V state) with an empty ledger under
    ``tmp_path / "empty"``: what every fuzz test starts from."""
    _, root = original
    data = json.loads((root / "ledger" / "ledger.json").read_text())
    pipe = _target_pipe()
    _empty_ledger(tmp_path / "empty", pipe.base_fingerprint)
    return root, data, pipe, kv_state(pipe)


def test_fuzzed_ledgers_are_refused_or_loaded_exactly(original, tmp_path):
    root, data, pipe, before = _fuzz_setup(original, tmp_path)
    rng = random.Random(20260101)
    outcomes: list[str] = []
    folder = tmp_path / "case"
    shutil.copytree(root / "ledger", folder)
    for _ in range(150):
        (folder / "ledger.json").write_text(mutate_json(data, rng))
        _check_load(pipe, folder, before, outcomes)
    assert outcomes.count("refused") > 100, outcomes.count("refused")  # most mutations break the format


def test_fuzzed_adapter_files_are_refused_or_loaded_exactly(original, tmp_path):
    source, root = original
    ledger = json.loads((root / "ledger" / "ledger.json").read_text())
    record = ledger["requests"][1]
    raw = (root / "ledger" / record["adapter"]["file"]).read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    tensors, metadata = st_load(raw), header["__metadata__"]
    info = json.loads(metadata["diffusers_unlearn"])
    pipe = _target_pipe()
    before = kv_state(pipe)
    _empty_ledger(tmp_path / "empty", pipe.base_fingerprint)
    rng = random.Random(7)

    def tensor_mutation() -> bytes:
        new, meta = {k: v.clone() for k, v in tensors.items()}, dict(metadata)
        key = rng.choice(sorted(new))
        kind = rng.choice(["nan", "inf", "shape", "dtype", "drop", "extra", "vector", "meta", "scale", "kind", "id"])
        if kind in ("nan", "inf"):
            flat = new[key].view(-1)
            flat[rng.randrange(flat.numel())] = float(kind)
        elif kind == "shape":
            new[key] = torch.zeros(new[key].shape[0] + rng.choice([-1, 1]), new[key].shape[1])
        elif kind == "dtype":
            new[key] = new[key].to(rng.choice([torch.int32, torch.float16, torch.bfloat16, torch.float64]))
        elif kind == "drop":
            del new[key]
        elif kind == "extra":
            new[f"{key}.extra"] = torch.zeros(2, 2)
        elif kind == "vector":
            new[key] = new[key].view(-1)
        elif kind == "meta":
            meta = rng.choice([{}, {"diffusers_unlearn": "{not json"}, {"other": "1"},
                               {"diffusers_unlearn": json.dumps({**info, "format": "x"})}])
        elif kind == "scale":
            layer = rng.choice(sorted(info["scales"]))
            value = rng.choice([float("nan"), float("inf"), "x", None])
            meta = {"diffusers_unlearn": json.dumps({**info, "scales": {**info["scales"], layer: value}})}
        elif kind == "kind":
            meta = {"diffusers_unlearn": json.dumps({**info, "kind": rng.choice(["dense", "bogus", 3])})}
        else:
            meta = {"diffusers_unlearn": json.dumps({**info, "request_id": rng.choice(["r0001", "../x", 1])})}
        return st_save(new, metadata=meta)

    def byte_mutation() -> bytes:
        data = bytearray(raw)
        if rng.random() < 0.3:
            return bytes(data[: rng.randrange(len(data))])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)

    folder = tmp_path / "case"
    outcomes: list[str] = []
    for i in range(120):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(root / "ledger", folder)
        mutated = tensor_mutation() if i % 2 else byte_mutation()
        case = json.loads(json.dumps(ledger))
        case["requests"][1]["adapter"]["sha256"] = hashlib.sha256(mutated).hexdigest()  # reach the parser
        (folder / record["adapter"]["file"]).write_bytes(mutated)
        (folder / "ledger.json").write_text(json.dumps(case))
        _check_load(pipe, folder, before, outcomes)
    # without the updated checksum every change is caught by it
    shutil.rmtree(folder)
    shutil.copytree(root / "ledger", folder)
    (folder / record["adapter"]["file"]).write_bytes(byte_mutation())
    with pytest.raises(LedgerError, match="does not match the checksum|is missing"):
        pipe.load_unlearning(folder, replace=True)
    assert outcomes.count("refused") > 60


def test_fuzzed_state_files_are_refused_or_restored(original, tmp_path):
    source, root = original
    folder = tmp_path / "folder"
    shutil.copytree(root / "folder", folder)
    state_path = folder / UNLEARNING_DIR / STATE_FILE
    data = json.loads(state_path.read_text())
    plain = DiffusionPipeline.from_pretrained(folder)
    plain.set_progress_bar_config(disable=True)
    current = {n: w.detach().clone() for n, w in du.kv.adapters.kv_weights(plain.unet).items()}
    before = kv_state(plain)
    rng = random.Random(99)
    outcomes = []
    for _ in range(80):
        state_path.write_text(mutate_json(data, rng))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a changed folded fingerprint starts a new ledger, with a warning
                state = read_saved_unlearning(plain, current)
        except LedgerError:
            outcomes.append("refused")
        else:
            outcomes.append("new ledger" if state is None else "restored")
            saved = read_saved_state(folder)
            assert saved == json.loads(state_path.read_text())  # what was used is what the file says
            if state is not None:
                assert state.ledger.ids() == saved["requests"]
                assert state.ledger.base_fingerprint == saved["base_fingerprint"]
        after = kv_state(plain)
        assert all(torch.equal(after[k], before[k]) for k in before)
    assert outcomes.count("refused") > 40


PLAN = {
    "model": "tiny",
    "output": "out",
    "base_model": "user/base",
    "strategy": "sequential",
    "defaults": {"method": "esd", "steps": 4, "learning_rate": 1e-3, "sampling_steps": 4},
    "requests": [
        {"concept": "van gogh", "domain": "style", "regularizers": [{"name": "l2_drift", "weight": 100.0}]},
        {"concept": "cat", "domain": "object", "method": "ca", "anchor": "a dog", "seed": 3,
         "templates": ["a photo of {}", "a {} on grass"]},
    ],
}


def test_fuzzed_plan_files_give_a_plan_error_or_a_valid_plan(tmp_path):
    rng = random.Random(5)
    path = tmp_path / "PLAN.yaml"
    outcomes = []
    for _ in range(150):
        path.write_text(mutate_json(PLAN, rng))  # JSON is YAML: the same mutations reach the plan loader
        try:
            plan = load_plan(path)
        except PlanError:
            outcomes.append("refused")
            continue
        outcomes.append("loaded")
        for planned in plan.requests:  # a plan that loads is one that can run: every setting valid and finite
            planned.signature()
            du.TrainingConfig(**planned.training.to_dict())
    assert outcomes.count("refused") > 50 and "loaded" in outcomes


# ---------------------------------------------------------------------------------------------- issue 28 cases
BOUNDS = [  # (path into the ledger, values around and far beyond the bound)
    (("next_index",), [3, 999_999_999, 1_000_000_000, 1_000_000_001, 10**18]),
    (("requests", 0, "seed"), [0, 2**63 - 1, 2**63, 2**70, -1]),
    (("requests", 0, "steps"), [0, 1_000_000, 1_000_001, 10**15]),
    (("requests", 0, "seconds"), [0, 1e9, 1e9 + 1, 1e300]),
    (("requests", 1, "index"), [2, 999_999_999, 10**9, 10**12]),
    (("requests", 0, "adapter", "ranks"), [[0], [65537], [-1], [1], [10**6]]),
]
INCONSISTENT = [
    (("requests", 0, "adapter", "kind"), ["dense", "lora"]),
    (("requests", 0, "adapter", "targets"), [["attn2.to_k"], ["attn1.to_q", "attn2.to_v"], []]),
    (("requests", 0, "method"), ["ca", "closed_form", "nope"]),
    (("requests", 0, "method_config", "junk"), [1, None]),
    (("requests", 0, "method_config", "sampling_steps"), ["4", 4.5, 0, 10**7]),
    (("requests", 0, "regularizers"), [[{"name": "nope"}], [{"name": "l2_drift", "weight": -1}],
                                       [{"name": "l1_drift", "bogus": 2}], [{"name": "l2_drift", "weight": "1"}]]),
]


def _set(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def _huge_header(path: Path, rng: random.Random) -> None:
    """A sparse adapter file whose header declares gigabytes (or is malformed), never written out in full."""
    size = rng.choice([2**31, 3 * 10**9, 2**33 + 8])
    entry = {"dtype": rng.choice(["F32", "I64", "F8"]), "shape": [size // 4, 1], "data_offsets": [0, size]}
    header = json.dumps({rng.choice(["x.lora_A", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.delta"]):
                         entry}).encode()
    length = rng.choice([len(header), 2**40, 1])
    with open(path, "wb") as handle:
        handle.write(length.to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + size)


def test_fuzzed_bounds_inconsistencies_headers_temporaries_and_lock_interrupts(original, tmp_path, monkeypatch):
    """Issue 28's cases generated from a seed: every fuzzed ledger is refused, or loads exactly and then saves into
    a folder that loads again (a save never writes what a load refuses); huge headers are refused before the file
    is hashed; stale temporaries go at the next save; an interrupt at any point of the lock leaves it free."""
    import fcntl

    from diffusers_unlearn import _atomic
    from diffusers_unlearn.engine import ledger as ledger_module

    source = original[0]
    root, data, pipe, before = _fuzz_setup(original, tmp_path)
    rng = random.Random(28)
    outcomes: list[str] = []
    for case in range(60):
        folder = tmp_path / f"case{case}"
        shutil.copytree(root / "ledger", folder)
        kind = rng.choice(["bound", "bound", "inconsistent", "inconsistent", "duplicate", "header", "temporaries",
                           "lock"])
        if kind in ("bound", "inconsistent", "duplicate"):
            mutated = json.loads(json.dumps(data))
            path, values = rng.choice(BOUNDS if kind == "bound" else INCONSISTENT)
            _set(mutated, path, rng.choice(values))
            text = json.dumps(mutated, indent=2)
            if kind == "duplicate":
                text = text.replace('"next_index": ', '"next_index": 1, "next_index": ', 1)
            (folder / "ledger.json").write_text(text)
            _check_load(pipe, folder, before, outcomes)
            if outcomes[-1] == "loaded":
                pipe.load_unlearning(folder, replace=True)
                pipe.save_unlearning(tmp_path / f"again{case}")
                assert _target_pipe().load_unlearning(tmp_path / f"again{case}") == pipe.unlearning_ledger.ids()
                pipe.load_unlearning(tmp_path / "empty", replace=True)
        elif kind == "header":
            target = folder / data["requests"][rng.randrange(2)]["adapter"]["file"]
            _huge_header(target, rng)
            real_hash = ledger_module.file_sha256
            with monkeypatch.context() as patch:
                patch.setattr(ledger_module, "file_sha256", lambda p, *a, target=target: pytest.fail(
                    f"{p} hashed before its header") if Path(p) == target else real_hash(p, *a))
                _check_load(pipe, folder, before, outcomes)
            assert outcomes[-1] == "refused"
        elif kind == "temporaries":
            alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
            stale = []
            for _ in range(rng.randint(1, 4)):
                name = rng.choice(["ledger.json", Path(data["requests"][0]["adapter"]["file"]).name])
                where = folder if name == "ledger.json" else folder / "adapters"
                stale.append(where / f".{name}.{''.join(rng.choice(alphabet) for _ in range(8))}.tmp")
                stale[-1].write_bytes(rng.randbytes(rng.randint(0, 64)))
            source.save_unlearning(folder)
            assert not any(p.exists() for p in stale)
            outcomes.append("cleaned")
        else:
            point = rng.choice(["flock", "unlock", "close", "body"])
            real_flock, real_close, armed = fcntl.flock, os.close, [True]

            def hit(name, point=point, armed=armed):
                if armed[0] and name == point:
                    armed[0] = False
                    raise KeyboardInterrupt(name)

            with monkeypatch.context() as patch:
                patch.setattr(fcntl, "flock", lambda fd, op: (hit("unlock" if op == fcntl.LOCK_UN else "flock"),
                                                              real_flock(fd, op))[1])
                patch.setattr(os, "close", lambda fd: (hit("close"), real_close(fd))[1])
                with pytest.raises(KeyboardInterrupt):
                    with _atomic.folder_lock(folder, shared=rng.random() < 0.5):
                        hit("body")
            fd = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises BlockingIOError if the lock leaked
            finally:
                os.close(fd)
            outcomes.append("unlocked")
        shutil.rmtree(folder)
    assert {"refused", "loaded", "cleaned", "unlocked"} <= set(outcomes), outcomes
