"""Two CPU processes (gloo) train through accelerate exactly as one process with the same global batch does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import DATA_PARALLEL, MERGE_REQUESTS

import diffusers_unlearn as du
from diffusers_unlearn.ledger import read_ledger_dir


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    worker = Path(__file__).with_name("distributed_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _artifacts(directory: Path):
    ledger, artifacts = read_ledger_dir(directory)
    return ledger, artifacts


def _assert_same(a, b, atol):
    assert a.kind == b.kind and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        torch.testing.assert_close(a.tensors[key], b.tensors[key], rtol=0, atol=atol, msg=key)


def test_data_parallel_equals_one_process_with_the_same_global_batch(launched):
    (l0, a0), (_, a1) = _artifacts(launched / "data_parallel/rank0"), _artifacts(launched / "data_parallel/rank1")
    assert l0.requests[0].timing["processes"] == 2
    # atol=0: the all-reduce hands both ranks the same averaged gradient bits, and each rank then applies the same
    # optimizer step to the same parameters, so their adapters are one computation, not two
    _assert_same(a0["r0001"], a1["r0001"], atol=0)

    torch.set_num_threads(1)
    single = du.attach(du.testing.tiny_pipeline(seed=0))
    single.unlearn(progress=False, **DATA_PARALLEL)
    _assert_same(a0["r0001"], single.request_adapter("r0001"), atol=1e-5)

    # gradient projection's invariant holds exactly on the adapter the two processes trained
    single.load_unlearning(launched / "data_parallel/rank0", replace=True)
    base = single._unlearning().base_weights
    for concept, domain in (("monet", None), ("monet", "style")):
        c = du.concept_embedding(single, concept, domain)
        for layer in a0["r0001"].layers:
            ratio = (a0["r0001"].delta(layer) @ c).norm() / (base[layer] @ c).norm()
            assert ratio < 1e-4, (layer, float(ratio))


def test_merge_requests_trained_in_parallel_equal_training_them_one_after_another(launched):
    rank0, rank1 = launched / "merge/rank0", launched / "merge/rank1"
    assert json.loads((rank0 / "ledger.json").read_text()) == json.loads((rank1 / "ledger.json").read_text())
    ledger, parallel = _artifacts(rank0)
    assert [r.concept for r in ledger.requests] == ["van gogh", "dog", "cat"]

    torch.set_num_threads(1)
    one_by_one = du.attach(du.testing.tiny_pipeline(seed=0))
    for options in MERGE_REQUESTS:
        one_by_one.unlearn(strategy="ties", progress=False, **options)
    for request_id in ("r0001", "r0002", "r0003"):
        _assert_same(parallel[request_id], one_by_one.request_adapter(request_id), atol=1e-6)
