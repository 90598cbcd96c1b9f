"""merging.py: merge strategies by hand computation, and requests trained from the base then combined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import FAST, generate

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.kv.merging import MergeStrategy

TRAIN = dict(FAST, steps=12)


# ------------------------------------------------------------------------------------ merging
def test_ties_and_task_arithmetic_match_a_hand_computation():
    a = torch.tensor([[1.2, -2.0, 0.5], [3.0, 0.1, -1.0]])
    b = torch.tensor([[-1.5, -1.0, 0.2], [2.0, -0.3, 2.5]])
    # TIES, density 0.5 (keep 3 of 6 per tensor): a -> [[1.2,-2,0],[3,0,0]], b -> [[-1.5,0,0],[2,0,2.5]]
    # elected sign = sign of the sum (zero counts as +); disjoint mean of the agreeing non-zero entries; times lambda
    expected = torch.tensor([[-1.5, -2.0, 0.0], [2.5, 0.0, 2.5]]) * 1.25
    merged = MergeStrategy("ties", density=0.5).combine([a, b])
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(MergeStrategy("ties", density=0.5, scale=2.0).combine([a, b]), expected / 1.25 * 2)
    torch.testing.assert_close(MergeStrategy("task_arithmetic", scale=0.7).combine([a, b]), 0.7 * (a + b))
    torch.testing.assert_close(MergeStrategy("uniform").combine([a, b]), (a + b) / 2)
    assert MergeStrategy("ties").scale_for(12) == pytest.approx(2.75)
    for strategy in (MergeStrategy("ties"), MergeStrategy("task_arithmetic", scale=3.0), MergeStrategy("uniform")):
        assert torch.equal(strategy.combine([a]), a)  # merge of a single request is that request


def test_merge_strategy_trains_from_the_base_and_composes_by_ties():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    base = {n: w.clone() for n, w in pipe._unlearning().base_weights.items()}

    @dataclass
    class FromBase(du.Regularizer):
        name: ClassVar[str] = "from_base"

        setups: ClassVar[list[str]] = []

        def setup(self, ctx):
            for n, w in base.items():
                assert torch.equal(ad.kv_linear(ctx.denoiser, n).weight, w), n
            self.setups.append(ctx.concept)

    strategy = MergeStrategy("ties", density=0.5)
    r1 = pipe.unlearn("van gogh", domain="style", seed=0, strategy=strategy, **TRAIN)
    single = generate(pipe)
    with pipe.audit(r1.request_id):
        assert torch.equal(generate(pipe), single)  # merge of one request is that request
    r2 = pipe.unlearn("dog", domain="object", seed=1, strategy=strategy, regularizers=[FromBase()], **TRAIN)
    assert FromBase.setups == ["dog"]  # the start-from-the-base check above ran for this request
    stacked = generate(pipe)
    pipe.fold()
    d1, d2 = pipe.request_adapter(r1.request_id), pipe.request_adapter(r2.request_id)
    for n, w in base.items():
        expected = w + strategy.combine([d1.delta(n), d2.delta(n)])
        torch.testing.assert_close(ad.kv_linear(pipe.unet, n).weight, expected, rtol=0, atol=1e-6)
    assert (generate(pipe) - stacked).abs().max() < 1e-4
    with pytest.raises(ValueError, match="one strategy"):
        pipe.unlearn("cat", strategy="sequential", **TRAIN)
