"""Training options users expect on a GPU, checked on the CPU: checkpointing, mixed precision, accumulation,
parallel merge requests in one process."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

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


@dataclass
class AccumulationProbe(du.Regularizer):
    """Counts micro-batches per optimizer step and, at step 0, recomputes the accumulated gradient by hand: the
    mean of the gradients of ``micro_batches`` separately drawn minibatches, from the generator state training
    started with."""

    name: ClassVar[str] = "accumulation_probe"
    micro_batches: int = 3
    batch_size: int = 1

    def setup(self, ctx):
        self.start_state = ctx.objective.context.generator.get_state()
        self.losses_per_step: dict[int, int] = {}

    def loss(self, ctx):
        self.losses_per_step[ctx.step] = self.losses_per_step.get(ctx.step, 0) + 1
        return None

    def transform_gradients(self, ctx):
        if ctx.step != 0:
            return
        params = ctx.adapter.parameters
        self.accumulated = [p.grad.detach().clone() for p in params]
        generator = ctx.objective.context.generator
        state_now = generator.get_state()
        generator.set_state(self.start_state)
        per_batch = [torch.autograd.grad(ctx.objective.training_loss(self.batch_size), params, allow_unused=True)
                     for _ in range(self.micro_batches)]
        generator.set_state(state_now)  # training goes on as if nothing happened
        zero = [torch.zeros_like(p) for p in params]
        per_batch = [[g if g is not None else z for g, z in zip(grads, zero)] for grads in per_batch]
        self.by_hand = [sum(grads[i] for grads in per_batch) / self.micro_batches for i in range(len(params))]
        self.first_batch = per_batch[0]


def test_gradient_accumulation_runs_micro_batches_per_step():
    _, record, _ = _adapter(training=du.TrainingConfig(gradient_accumulation_steps=3, steps=FAST["steps"],
                                                       learning_rate=FAST["learning_rate"]))
    assert record.training["gradient_accumulation_steps"] == 3 and record.final_loss == record.final_loss


def test_gradient_accumulation_averages_the_gradients_of_separately_drawn_micro_batches():
    probe = AccumulationProbe(micro_batches=3, batch_size=1)
    _adapter(regularizers=[probe], training=du.TrainingConfig(
        gradient_accumulation_steps=3, batch_size=1, steps=FAST["steps"], learning_rate=FAST["learning_rate"]))
    assert probe.losses_per_step == {step: 3 for step in range(FAST["steps"])}  # 3 forward passes per step
    # float32 sums of the same three gradients in another order: equal to rounding
    for accumulated, by_hand in zip(probe.accumulated, probe.by_hand):
        torch.testing.assert_close(accumulated, by_hand, rtol=1e-5, atol=1e-7)
    # ... and not the gradient of one micro-batch: the three draws differ
    difference = max(float((a - f).abs().max()) for a, f in zip(probe.accumulated, probe.first_batch))
    scale = max(float(a.abs().max()) for a in probe.accumulated)
    assert difference > 1e-3 * scale > 0


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
                   regularizers=[du.GradientProjection(retain=["monet"], neighbors=2)], progress=False)
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
