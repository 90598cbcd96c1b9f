"""Two CPU processes (gloo) train through accelerate exactly as one process with the same global batch does, and
share out an evaluation's images (alone and in the bench) with the scores of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import (
    DATA_PARALLEL,
    EVAL,
    EVAL_OBJECTS,
    EVAL_STYLES,
    MERGE_REQUESTS,
    ChannelClassifier,
    tiny_bench_settings,
    tiny_bench_world,
)

import diffusers_unlearn as du
from diffusers_unlearn import bench
from diffusers_unlearn.evaluation import EvalConfig, evaluate_unlearning
from diffusers_unlearn.engine.ledger import read_ledger_dir


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    worker = Path(__file__).with_name("distributed_worker.py")
    # the workers import the package this test imported (a checkout's, not another installed copy)
    package_root = str(Path(du.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(out)],
        capture_output=True, text=True, timeout=600, env=env,
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


def test_an_evaluation_on_two_processes_equals_one_process(launched):
    ranks = [json.loads((launched / f"eval_rank{r}.json").read_text()) for r in (0, 1)]
    images = [torch.load(launched / f"eval_images_rank{r}.pt") for r in (0, 1)]
    # the 3 batches of 5, 5 and 2 images were shared out: each process drew and classified only its own
    assert [r["seen"] for r in ranks] == [[10, 10], [2, 2]]
    # and both processes returned everything, in case order
    assert torch.equal(images[0], images[1]) and ranks[0]["scores"] == {**ranks[1]["scores"],
                                                                        "seconds": ranks[0]["scores"]["seconds"]}

    torch.set_num_threads(1)  # the workers' thread count: one process's computation is the same, batch for batch
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.load_unlearning(launched / "data_parallel/rank0", replace=True)
    single = evaluate_unlearning(pipe, ["van gogh"], "style", ChannelClassifier(EVAL_STYLES),
                                 ChannelClassifier(EVAL_OBJECTS), EvalConfig(**EVAL), progress=False)
    # the same pipeline calls on the same batches: the images agree to float rounding and the scores exactly
    torch.testing.assert_close(images[0], single.images, rtol=0, atol=1e-6)
    shared = ranks[0]["scores"]
    for key in ("ua", "ira", "cra", "accuracy", "cross_accuracy", "cross_removed", "num_images"):
        assert shared[key] == getattr(single, key), key


def test_the_bench_on_two_processes_equals_one_process(launched):
    ranks = [json.loads((launched / f"bench_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["environment"]["processes"] == 2
    torch.set_num_threads(1)
    single = bench.run_bench(tiny_bench_world(), tiny_bench_settings(), progress=False, log=None)
    assert single["environment"]["processes"] == 1
    scored = ("ua", "ira", "cra", "accuracy", "cross_accuracy", "cross_removed", "ua_heldout", "heldout_accuracy")
    for result in ranks:
        # the closed form solves each request alike in every process, and the images are the same batch for batch:
        # every score equals one process's
        rows, expected = result["protocols"]["closed_form"]["rows"], single["protocols"]["closed_form"]["rows"]
        assert len(rows) == len(expected) == 3
        for row, want in zip(rows, expected):
            assert {k: row[k] for k in scored} == {k: want[k] for k in scored}, row["request"]
            assert row["drift"] == want["drift"]
            assert (row["image_change"] is None) == (row["request"] == 0)  # two seeds: the seed gap is defined
            if row["request"]:
                assert row["image_change"] == pytest.approx(want["image_change"], rel=1e-5, abs=1e-7)
        # the trained protocol trained data-parallel: its adapters equal one process's to float rounding
        # (test_data_parallel_equals_one_process_with_the_same_global_batch), so its drift does too
        rows, expected = result["protocols"]["sequential"]["rows"], single["protocols"]["sequential"]["rows"]
        assert [r["drift"] for r in rows] == pytest.approx([r["drift"] for r in expected], rel=1e-4, abs=1e-9)
        assert all(r["drift"] > 0 for r in rows[1:])
    for name in ("closed_form", "sequential"):  # the two processes hand back one result
        assert ranks[0]["protocols"][name]["rows"][1]["accuracy"] == ranks[1]["protocols"][name]["rows"][1]["accuracy"]


def test_the_bench_refuses_a_batch_the_processes_cannot_share(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    settings = bench.BenchSettings(requests=1, protocols=["sequential"], hparams=bench.Hyperparameters(steps=2))
    with pytest.raises(ValueError, match="batch_size 1 must be a multiple of 2"):
        bench.run_bench(tiny_bench_world(), settings, progress=False, log=None)
    with pytest.raises(ValueError, match="jobs must be 1"):
        bench.run_bench(tiny_bench_world(), settings, progress=False, log=None, jobs=2, world_factory=tiny_bench_world)
