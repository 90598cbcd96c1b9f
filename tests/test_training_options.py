"""Training options users expect on a GPU, checked on the CPU: checkpointing, mixed precision, accumulation,
parallel merge requests in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import FAST

import diffusers_unlearn as du


def _adapter(**options):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    record = pipe.unlearn("van gogh", domain="style", seed=0, **{**FAST, **options})
    return pipe, record, pipe.request_adapter(record.request_id)


def test_gradient_checkpointing_trains_the_same_adapter():
    _, _, plain = _adapter()
    pipe, _, checkpointed = _adapter(training=du.TrainingConfig(gradient_checkpointing=True, steps=FAST["steps"],
                                                                 learning_rate=FAST["learning_rate"]))
    for key in plain.tensors:
        torch.testing.assert_close(checkpointed.tensors[key], plain.tensors[key], rtol=0, atol=1e-6)
    assert not pipe.unet.is_gradient_checkpointing  # switched back off after the request


def test_parallel_merge_requests_in_one_process_equal_one_after_another():
    requests = [dict(concept="van gogh", domain="style", seed=0, **FAST), dict(concept="dog", domain="object", seed=1,
                                                                               **FAST)]
    parallel = du.attach(du.testing.tiny_pipeline(seed=0))
    records = parallel.unlearn_parallel(requests, strategy="ties", progress=False)
    serial = du.attach(du.testing.tiny_pipeline(seed=0))
    for options in requests:
        serial.unlearn(strategy="ties", **options)
    assert [r.concept for r in records] == serial.removed_concepts
    for request_id in ("r0001", "r0002"):
        a, b = parallel.request_adapter(request_id), serial.request_adapter(request_id)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    with pytest.raises(ValueError, match="needs a merge strategy"):
        parallel.unlearn_parallel(requests, strategy="sequential")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(mixed_precision="fp8"), "mixed_precision must be 'no', 'fp16' or 'bf16'"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an integer >= 1"),
    ],
)
def test_bad_training_options(options, match):
    with pytest.raises(ValueError, match=match):
        du.TrainingConfig(**options)


def test_a_second_mixed_precision_in_one_process_is_refused_clearly(pipe):
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)  # sets up accelerate with mixed_precision="no"
    with pytest.raises(ValueError, match="already set up in this process with mixed_precision='no'"):
        pipe.unlearn("dog", training=du.TrainingConfig(mixed_precision="bf16", steps=2))
    assert pipe.removed_concepts == ["van gogh"]


BF16 = """
import torch
torch.set_num_threads(1)
import diffusers_unlearn as du
pipe = du.attach(du.testing.tiny_pipeline(seed=0))
training = du.TrainingConfig(mixed_precision="bf16", steps=6, learning_rate=1e-2)
rec = pipe.unlearn("van gogh", domain="style", seed=0, training=training, sampling_steps=4, num_trajectories=2,
                   regularizers=[du.GradientProjection(keep=["monet"], neighbors=2)], progress=False)
art = pipe.request_adapter(rec.request_id)
assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in art.tensors.values())
c = du.concept_embedding(pipe, "monet")
base = pipe._unlearning().base_weights
worst = max(float((art.delta(n) @ c).norm() / (base[n] @ c).norm()) for n in art.layers)
assert worst < 1e-4, worst
assert rec.training["mixed_precision"] == "bf16"
print("BF16-OK", rec.final_loss)
"""


def test_bf16_autocast_keeps_float32_adapters_and_the_projection_invariant():
    result = subprocess.run([sys.executable, "-c", BF16], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BF16-OK" in result.stdout
