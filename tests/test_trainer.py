"""trainer.py: one request -> one adapter: what trains, the model it starts from, gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from conftest import FAST, kv_state
from test_training_options import _adapter

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad


@dataclass
class Probe(du.Regularizer):
    """Checks, at every step, what is trainable and what the frozen start model is."""

    name: ClassVar[str] = "probe"
    seen: list = None

    def setup(self, ctx):
        self.seen = []
        self.adapter_params = {id(p) for p in ctx.adapter.parameters}

    def after_step(self, ctx):
        trainable = [n for n, p in ctx.denoiser.named_parameters() if p.requires_grad]
        self.seen.append((trainable, {id(p) for p in ctx.denoiser.parameters() if p.requires_grad} == self.adapter_params))


def test_only_the_new_adapter_trains_and_earlier_ones_stay_bit_identical(pipe):
    first = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    stored_first = {k: v.clone() for k, v in pipe.request_adapter(first.request_id).tensors.items()}
    installed_first = kv_state(pipe)
    probe = Probe()
    pipe.unlearn("dog", domain="object", seed=1, regularizers=[probe], **FAST)
    assert len(probe.seen) == FAST["steps"]
    for trainable, only_adapter in probe.seen:
        assert only_adapter
        assert trainable and all("unlearn_training" in n for n in trainable)
    for key, value in pipe.request_adapter(first.request_id).tensors.items():
        assert torch.equal(value, stored_first[key]), key
    now = kv_state(pipe)
    for name, value in installed_first.items():  # the base weights; request 1's factors lead the stack
        current = now[name]
        if "lora_A" in name:
            current = current[: value.shape[0]]
        elif "lora_B" in name:
            current = current[:, : value.shape[1]]
        assert torch.equal(current, value), name
    assert pipe.unet.active_adapters() == ["unlearn_stack"]
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_training_starts_from_earlier_requests_folded(pipe):
    first = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    delta = pipe.request_adapter(first.request_id).delta
    expected = {n: w + delta(n) for n, w in pipe._unlearning().base_weights.items()}

    @dataclass
    class StartCheck(du.Regularizer):
        name: ClassVar[str] = "start_check"

        setups: ClassVar[list[str]] = []

        def setup(self, ctx):
            for n, w in expected.items():
                torch.testing.assert_close(ad.kv_linear(ctx.denoiser, n).weight, w, rtol=0, atol=1e-6)
            assert ctx.start_offsets is not None
            self.setups.append(ctx.concept)

    pipe.unlearn("dog", domain="object", seed=1, regularizers=[StartCheck()], **FAST)
    assert StartCheck.setups == ["dog"]  # the checks above ran, once, for this request


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
