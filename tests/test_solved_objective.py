"""The solved-method seam: a method that computes its change instead of training it is one config, one
``SolvedObjective`` subclass and one ``register_objective`` line; ``pipe.unlearn`` then solves, records, folds and
rolls it back like the built-in closed form, and the engine offers it a re-solve after a rollback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn.kv.adapters import RequestAdapter
from diffusers_unlearn.objectives import OBJECTIVES, SolveContext, SolvedObjective, register_objective
from diffusers_unlearn.engine.state import unlearning_state

SCALE = 0.25  # large against the tiny model's K/V entries (about 0.1), so the change is plainly there


@dataclass
class NudgeConfig(du.ObjectiveConfig):
    method: ClassVar[str] = "test_nudge"
    scale: float = SCALE


class NudgeObjective(SolvedObjective):
    """Adds scale x (1 + earlier requests) to one entry of the first K/V layer: a rank-1 change whose size shows
    how many requests came before it when it was solved. Keeps its artifact on rollback (the default hook)."""

    def solve(self, context: SolveContext) -> tuple[RequestAdapter, dict[str, Any]]:
        first = sorted(context.base_weights)[0]
        tensors, scales = {}, {}
        for layer, weight in context.base_weights.items():
            a, b = torch.zeros(1, weight.shape[1]), torch.zeros(weight.shape[0], 1)
            if layer == first:
                a[0, 0], b[0, 0] = 1.0, self.config.scale * (1 + len(context.earlier))
            tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = a, b
            scales[layer] = 1.0
        return RequestAdapter("lora", tensors, scales), {"layer": first, "earlier": len(context.earlier)}


@dataclass
class ResolvingNudgeConfig(NudgeConfig):
    method: ClassVar[str] = "test_resolving_nudge"


class ResolvingNudgeObjective(NudgeObjective):
    """The same change, solved again after a rollback on the requests that remain before it."""

    def after_rollback(self, context: SolveContext) -> RequestAdapter:
        return self.solve(context)[0]


@pytest.fixture
def registered():
    register_objective(NudgeConfig, NudgeObjective)  # the one line a new solved method needs
    register_objective(ResolvingNudgeConfig, ResolvingNudgeObjective)
    yield
    del OBJECTIVES[NudgeConfig.method], OBJECTIVES[ResolvingNudgeConfig.method]


def _weights(pipe) -> dict[str, torch.Tensor]:
    """Each K/V layer's weight as the folded pipeline uses it."""
    unet = pipe.unlearning_denoiser
    return {layer: unet.get_submodule(layer).weight.detach().clone() for layer in unlearning_state(pipe).base_weights}


def _change(pipe, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {layer: weight - base[layer] for layer, weight in _weights(pipe).items()}


def test_a_registered_solved_method_is_solved_recorded_and_rolled_back(registered):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.fold()
    base = _weights(pipe)
    first = sorted(base)[0]
    record = pipe.unlearn("van gogh", method="test_nudge", domain="style")
    assert record.method == "test_nudge" and record.steps == 0
    assert record.method_config["method"] == "test_nudge" and record.method_config["scale"] == SCALE
    assert record.regularizers == [{"name": "test_nudge", "report": {"layer": first, "earlier": 0}}]
    assert pipe.unlearning_ledger.ids() == [record.request_id]
    change = _change(pipe, base)
    # exactly the solve's one entry moved: float32 base + 0.25 rounds within 1 ulp of the base's scale
    assert change[first][0, 0].item() == pytest.approx(SCALE, abs=1e-6)
    change[first][0, 0] = 0
    assert all(bool((delta == 0).all()) for delta in change.values())
    pipe.rollback(record.request_id)
    assert pipe.unlearning_ledger.ids() == []
    assert all(torch.equal(weight, base[layer]) for layer, weight in _weights(pipe).items())


def test_a_solved_method_takes_no_regularizers(registered):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    with pytest.raises(ValueError, match=r"method 'test_nudge' is solved, not trained: it takes no regularizers "
                                         r"\(got \['l2_drift'\]\)"):
        pipe.unlearn("van gogh", method="test_nudge", regularizers=[du.L2Drift(weight=1.0)])
    assert pipe.unlearning_ledger.ids() == []


@pytest.mark.parametrize("method, resolved", [("test_nudge", False), ("test_resolving_nudge", True)])
def test_the_engine_offers_each_later_solved_request_a_re_solve(registered, method, resolved):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.fold()
    base = _weights(pipe)
    first = sorted(base)[0]
    r1 = pipe.unlearn("van gogh", method=method, domain="style").request_id
    r2 = pipe.unlearn("monet", method=method, domain="style").request_id  # solved after one request: 2 x SCALE
    assert _change(pipe, base)[first][0, 0].item() == pytest.approx(3 * SCALE, abs=1e-6)
    pipe.rollback(r1)
    event = pipe.unlearning_ledger.history[-1]
    assert event["request_id"] == r1
    if resolved:  # re-solved with no request before it: SCALE
        assert event["resolved"] == [r2]
        assert _change(pipe, base)[first][0, 0].item() == pytest.approx(SCALE, abs=1e-6)
    else:  # the default hook keeps the stored artifact
        assert "resolved" not in event
        assert _change(pipe, base)[first][0, 0].item() == pytest.approx(2 * SCALE, abs=1e-6)
