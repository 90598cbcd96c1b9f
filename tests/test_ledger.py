"""ledger.py: what a record holds, the saved ledger folder, and refused ledger folders."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
import torch
from conftest import FAST, generate

import diffusers_unlearn as du


def test_ledger_records_what_the_request_was(two_requests, tmp_path):
    pipe = two_requests
    record = pipe.unlearning_ledger.requests[0]
    assert (record.request_id, record.concept, record.domain, record.method) == ("r0001", "van gogh", "style", "esd")
    assert record.steps == FAST["steps"] and record.seed == 0 and record.seconds > 0
    assert record.base_fingerprint == pipe.base_fingerprint and record.library_version == du.__version__
    assert record.method_config["negative_guidance"] == 1.0 and record.method_config["sampling_steps"] == 4
    assert record.prompts == [t.format("van gogh") for t in du.TEMPLATES["style"]]
    assert record.final_loss == record.final_loss  # not NaN
    pipe.save_unlearning(tmp_path)
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert [r["concept"] for r in data["requests"]] == ["van gogh", "dog"]
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert [re.sub(r"-[0-9a-f]{16}\.", ".", n) for n in names] == ["r0001.safetensors", "r0002.safetensors"]
    assert [f"adapters/{n}" for n in names] == [r["adapter"]["file"] for r in data["requests"]]
    assert not list(tmp_path.rglob("*.tmp"))


def _saved(two_requests, tmp_path):
    two_requests.save_unlearning(tmp_path / "saved")
    return tmp_path / "saved"


def test_bad_ledger_directories_are_refused_and_change_nothing(two_requests, tmp_path):
    saved = _saved(two_requests, tmp_path)
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    before = generate(fresh)

    with pytest.raises(du.LedgerError, match="does not exist"):
        fresh.load_unlearning(tmp_path / "missing")

    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    (corrupted / "ledger.json").write_text("{not json")
    with pytest.raises(du.LedgerError, match="corrupted"):
        fresh.load_unlearning(corrupted)

    (corrupted / "ledger.json").write_text(json.dumps({"format": 1, "requests": [{"concept": "x"}]}))
    with pytest.raises(du.LedgerError, match="corrupted|missing field"):
        fresh.load_unlearning(corrupted)

    not_safetensors = tmp_path / "not_safetensors"
    subprocess.run(["cp", "-r", str(saved), str(not_safetensors)], check=True)
    data = json.loads((not_safetensors / "ledger.json").read_text())
    garbage = b"this is not a safetensors file at all"
    (not_safetensors / data["requests"][1]["adapter"]["file"]).write_bytes(garbage)
    # a matching checksum: the format check itself must catch it
    data["requests"][1]["adapter"]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (not_safetensors / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(du.LedgerError, match="r0002-[0-9a-f]{16}.safetensors is not a valid safetensors file"):
        fresh.load_unlearning(not_safetensors)

    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(saved), str(tampered)], check=True)
    first = tampered / json.loads((tampered / "ledger.json").read_text())["requests"][0]["adapter"]["file"]
    raw = bytearray(first.read_bytes())
    raw[-5] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(du.LedgerError, match="r0001-[0-9a-f]{16}.safetensors does not match the checksum"):
        fresh.load_unlearning(tampered)

    other_base = du.attach(du.testing.tiny_pipeline(seed=1))
    with pytest.raises(du.LedgerError) as info:
        other_base.load_unlearning(saved)
    assert two_requests.base_fingerprint in str(info.value) and other_base.base_fingerprint in str(info.value)

    assert fresh.removed_concepts == [] and other_base.removed_concepts == []
    assert torch.equal(generate(fresh), before)
    fresh.load_unlearning(saved)  # the good directory still loads afterwards
    assert fresh.removed_concepts == ["van gogh", "dog"]
    with pytest.raises(ValueError, match="already holds requests"):
        fresh.load_unlearning(saved)
    assert fresh.load_unlearning(saved, replace=True) == ["r0001", "r0002"]
