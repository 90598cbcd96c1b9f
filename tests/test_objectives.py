"""objectives/: the registry, config validation, and each method's prompts (what CA pairs with what)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import FAST, generate

import diffusers_unlearn as du
from diffusers_unlearn.objectives import OBJECTIVES, build_objective_config
from diffusers_unlearn.objectives.ca import CAObjective
from diffusers_unlearn.objectives.base import request_prompts_with
from diffusers_unlearn.objectives.esd import ESDObjective
from diffusers_unlearn.prompts import TEMPLATES, register_templates
from diffusers_unlearn.regularizers import REGULARIZERS


def test_a_method_name_is_registered_once():
    assert {"esd", "ca"} <= set(OBJECTIVES)
    before = dict(OBJECTIVES)

    @dataclass
    class Impostor(du.ObjectiveConfig):
        method: ClassVar[str] = "esd"

    with pytest.raises(ValueError, match=r"method 'esd' is already registered \(by .*ESDObjective\).*\['ca', 'closed_form', 'esd'"):
        du.register_objective(Impostor, ESDObjective)
    assert OBJECTIVES == before  # the first registration stands
    assert type(build_objective_config("esd")) is du.ESDConfig


def test_a_regularizer_name_is_registered_once():
    before = dict(REGULARIZERS)

    with pytest.raises(ValueError, match="regularizer 'l2_drift' is already registered .*pick another name"):
        @du.register_regularizer
        @dataclass
        class Impostor(du.Regularizer):
            name: ClassVar[str] = "l2_drift"

    assert REGULARIZERS == before


def test_a_template_domain_is_registered_once_unless_replaced():
    register_templates("objectives-test-domain", ["a {} thing"])
    with pytest.raises(ValueError, match="domain 'objectives-test-domain' is already registered .*replace=True"):
        register_templates("objectives-test-domain", ["another {} thing"])
    assert TEMPLATES["objectives-test-domain"] == ("a {} thing",)
    register_templates("objectives-test-domain", ["another {} thing"], replace=True)
    assert TEMPLATES["objectives-test-domain"] == ("another {} thing",)
    del TEMPLATES["objectives-test-domain"]


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(), ValueError, "needs an anchor"),
        (dict(anchor="x", concepts="van gogh"), ValueError, "concepts must be a non-empty list"),
        (dict(anchor="x", concepts=()), ValueError, "concepts must be a non-empty list"),
        (dict(anchor="x", concepts=("a", "  ")), ValueError, "each of concepts must be a non-empty string"),
        (dict(anchor="Monet", concepts=("van gogh", "monet")), ValueError, "anchor 'Monet' is one of the concepts"),
        (dict(anchor="x", sampling_steps=0), ValueError, "sampling_steps must be an integer >= 1"),
        (dict(anchor="x", nope=1), TypeError, r"method 'ca' has no option\(s\) \['nope'\]"),
    ],
)
def test_bad_ca_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        build_objective_config("ca", options)


def test_ca_record_keeps_its_one_concept_form_and_lists_several_concepts():
    assert "concepts" not in du.CAConfig(anchor="a painting").to_dict()
    several = du.CAConfig(anchor="a painting", concepts=(" van gogh", "neon dots", "dots")).to_dict()
    assert several["method"] == "ca" and several["concepts"] == ["van gogh", "neon dots", "dots"]
    assert du.CAConfig(**{k: v for k, v in several.items() if k != "method"}).to_dict() == several  # round trip


def _ca_anchor_prompts(pipe, concept, prompts, **options) -> list[str]:
    """The anchor prompts CA pairs with ``prompts`` (its prepare() also samples the anchor trajectories)."""
    config = du.CAConfig(sampling_steps=2, num_trajectories=len(prompts), **options)
    context = du.objectives.ObjectiveContext(
        pipe=pipe, conditioner=du.families.conditioning.TextConditioner(pipe), denoiser=pipe.unet, concept=concept,
        prompts=prompts, frozen=torch.no_grad, generator=torch.Generator().manual_seed(0))
    objective = CAObjective(config, context)
    objective.prepare()
    assert objective.latents.shape[1] == len(prompts)  # one anchor trajectory per prompt
    return objective.anchor_prompts


def test_ca_swaps_each_prompts_own_concept_longest_first():
    pipe = du.testing.tiny_pipeline(seed=0)
    prompts = ["a dog in neon dots style", "a cat in dots style", "Van Gogh painting of a city"]
    anchors = _ca_anchor_prompts(pipe, "neon dots+dots+van gogh", prompts, anchor="plain",
                                 concepts=("dots", "neon dots", "van gogh"))
    assert anchors == ["a dog in plain style", "a cat in plain style", "plain painting of a city"]
    # one concept: the request's concept is swapped in each prompt
    assert _ca_anchor_prompts(pipe, "dots", prompts[1:2], anchor="plain") == ["a cat in plain style"]


def test_multi_concept_ca_trains_as_method_ca():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    prompts = ["a dog in van gogh style", "a cat in monet style"]
    record = pipe.unlearn("van gogh+monet", "ca", anchor="plain", concepts=("van gogh", "monet"), prompts=prompts,
                          steps=2, sampling_steps=2, num_trajectories=2, learning_rate=FAST["learning_rate"],
                          progress=False)
    assert record.method == "ca" and record.method_config["concepts"] == ["van gogh", "monet"]
    assert record.prompts == prompts


@pytest.mark.parametrize("options, match", [
    (dict(reference="prompt"), r"reference must be one of \['empty', 'context'\], got 'prompt'"),
    (dict(reference="context", concepts="van gogh"), "concepts must be a non-empty list"),
])
def test_bad_esd_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        build_objective_config("esd", options)


def test_esd_with_the_context_reference_steers_from_the_prompt_without_the_concept():
    pipe = du.testing.tiny_pipeline(seed=0)
    objective = _objective(pipe, "esd", negative_guidance=2.0, reference="context")
    conditioner = objective.context.conditioner
    rows = torch.arange(3)  # 3 trajectories over the 2 prompts: rows 0 and 2 are the first prompt's
    latents, timesteps = objective.latents[2], objective.timesteps[2].expand(3)
    with torch.no_grad():
        target = objective.frozen_target(latents, timesteps, rows)
        # the prompts without "van gogh" ("a painting in style", "art"), predicted one by one
        without = conditioner.encode(["a painting in style", "art", "a painting in style"])
        concept = conditioner.encode(["a painting in van gogh style", "van gogh art", "a painting in van gogh style"])
        reference = conditioner.predict(pipe.unet, latents, timesteps, without).float()
        prediction = conditioner.predict(pipe.unet, latents, timesteps, concept).float()
        empty = conditioner.predict(pipe.unet, latents, timesteps, conditioner.encode_unconditional(3)).float()
    torch.testing.assert_close(target, reference - 2.0 * (prediction - reference), rtol=1e-4, atol=1e-5)
    # the default reference is ESD's own, the unconditional prediction
    default = _objective(pipe, "esd", negative_guidance=2.0)
    with torch.no_grad():
        torch.testing.assert_close(default.frozen_target(latents, timesteps, rows),
                                   empty - 2.0 * (prediction - empty), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reference, empty, atol=1e-3)  # the two references differ: the test can tell them apart


def test_esd_context_reference_takes_each_prompts_own_concept_out():
    pipe = du.testing.tiny_pipeline(seed=0)
    config = du.ESDConfig(reference="context", concepts=("dots", "neon dots"), sampling_steps=2, num_trajectories=2)
    context = du.objectives.ObjectiveContext(
        pipe=pipe, conditioner=du.families.conditioning.TextConditioner(pipe), denoiser=pipe.unet, concept="neon dots+dots",
        prompts=["a dog in neon dots style", "a cat in dots style"], frozen=torch.no_grad,
        generator=torch.Generator().manual_seed(0))
    assert request_prompts_with(context, "", config.concepts) == ["a dog in style", "a cat in style"]
    assert config.to_dict()["concepts"] == ["dots", "neon dots"] and "concepts" not in du.ESDConfig().to_dict()
    bad = du.objectives.ObjectiveContext(**{**context.__dict__, "prompts": ["a dog in monet style"]})
    with pytest.raises(ValueError, match=r"prompt 'a dog in monet style' contains none of the concepts"):
        ESDObjective(config, bad).prepare()


def _objective(pipe, method, **options):
    config = build_objective_config(method, {"sampling_steps": 6, "num_trajectories": 3, **options})
    context = du.objectives.ObjectiveContext(
        pipe=pipe, conditioner=du.families.conditioning.TextConditioner(pipe), denoiser=pipe.unet, concept="van gogh",
        prompts=["a painting in van gogh style", "van gogh art"], frozen=torch.no_grad,
        generator=torch.Generator().manual_seed(0))
    objective = OBJECTIVES[method][1](config, context)
    objective.prepare()
    return objective


@pytest.mark.parametrize("method, options", [("esd", {"negative_guidance": 2.0}), ("ca", {"anchor": "plain"})])
def test_batched_frozen_targets_equal_the_one_step_at_a_time_targets(method, options):
    # The targets as they were computed before batching: every trajectory at one step, in one frozen pass.
    pipe = du.testing.tiny_pipeline(seed=0)
    objective = _objective(pipe, method, **options)
    rows = torch.arange(3)
    with torch.no_grad():
        reference = torch.stack([objective.frozen_target(objective.latents[s], objective.timesteps[s].expand(3), rows)
                                 for s in range(len(objective.timesteps))]).float()
    computed = objective.precompute_targets(calls=500, batch_size=4, points_per_batch=7)
    assert computed == 6 * 3  # 2000 draws over 18 points visit every one
    batched = torch.stack([objective.targets_at(s) for s in range(6)])
    # float32 results of one computation in batches of 7 points vs 3: agreement to float32 rounding
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert objective.precompute_targets(calls=10, batch_size=4) == 0  # nothing left to compute


def test_precomputed_targets_are_exactly_the_points_training_draws():
    pipe = du.testing.tiny_pipeline(seed=0)
    objective = _objective(pipe, "esd", sampling_steps=20)
    computed = objective.precompute_targets(calls=5, batch_size=2, shard=(1, 2))
    have = objective._have_target.clone()
    assert 1 <= computed <= 5 and int(have.sum()) == computed  # only process 1's half of each batch
    calls = []
    original = objective.frozen_target
    objective.frozen_target = lambda *a: calls.append(a) or original(*a)
    losses = [objective.training_loss(2, shard=(1, 2)) for _ in range(5)]
    assert calls == [] and all(torch.isfinite(loss) for loss in losses)  # the training steps paid no frozen pass
    assert torch.equal(objective._have_target, have)
    objective.training_loss(2, shard=(1, 2))  # a sixth call was not planned for: computed on demand
    assert len(calls) <= 1


def test_training_draws_the_same_points_with_or_without_precomputed_targets(monkeypatch):
    def trained() -> tuple[dict[str, torch.Tensor], int]:
        pipe = du.attach(du.testing.tiny_pipeline(seed=0))
        record = pipe.unlearn("van gogh", domain="style", seed=3, progress=False, **FAST)
        return generate(pipe), record.timing["frozen_targets"]

    base = generate(du.testing.tiny_pipeline(seed=0))
    with_targets, computed = trained()
    # the former behaviour: every target computed on demand inside the loop
    monkeypatch.setattr(du.objectives.base.TrajectoryObjective, "precompute_targets", lambda self, *a, **k: 0)
    without, none = trained()
    assert computed > 0 and none == 0
    assert (with_targets - base).abs().max() > 1e-3  # the request changed the images
    # same draws, same targets up to float32 rounding of the batched passes: the same images
    torch.testing.assert_close(with_targets, without, rtol=0, atol=1e-4)


@pytest.mark.parametrize("options, match", [
    (dict(keep="monet"), "keep must be a list of concepts, got the string 'monet'"),
    (dict(keep=["monet", "Monet"]), "keep lists a concept twice"),
    (dict(keep=["monet"], keep_weight=float("inf")), "keep_weight must be a number >= 0"),
    (dict(keep=[" "]), "each of keep must be a non-empty string"),
])
def test_bad_retain_options_are_refused(options, match):
    for method, extra in (("esd", {}), ("ca", {"anchor": "plain"})):
        with pytest.raises(ValueError, match=match):
            build_objective_config(method, {**options, **extra})


def test_a_request_cannot_keep_what_it_removes():
    pipe = du.testing.tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"keep lists \['Van Gogh'\], which this request removes"):
        _objective(pipe, "esd", keep=["monet", "Van Gogh"])


def test_the_retain_loss_is_recorded_only_when_used():
    assert "keep" not in du.ESDConfig().to_dict() and "keep_weight" not in du.CAConfig(anchor="x").to_dict()
    record = du.ESDConfig(keep=["monet"], keep_weight=2.0).to_dict()
    assert record["keep"] == ["monet"] and record["keep_weight"] == 2.0
    assert build_objective_config("esd", {k: v for k, v in record.items() if k != "method"}) == \
        du.ESDConfig(keep=("monet",), keep_weight=2.0)


def test_the_retain_loss_adds_the_kept_prompts_error_against_the_frozen_model():
    pipe = du.testing.tiny_pipeline(seed=0)
    objective = _objective(pipe, "esd", keep=["monet", "picasso"], keep_weight=3.0)
    assert objective.preserved_cond.hidden_states.shape[0] == 2 * 2  # kept concept x request prompt
    steps, rows, kept = torch.tensor([1, 4]), torch.tensor([2, 0]), torch.tensor([1, 0])
    conditioner = objective.context.conditioner
    frozen = objective._preserved_targets_for(steps, rows, kept).clone()  # the test's "frozen" is the same UNet:
    objective._loss(steps, rows)  # store every target before the UNet below moves
    with torch.no_grad():
        # a model that differs from the frozen one: the kept term is not zero
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        loss = objective._loss(steps, rows, kept)
        latents, timesteps = objective.latents[steps, rows], objective.timesteps[steps]
        # rows 2 and 0 are both the first prompt's trajectories; kept 1 -> picasso, 0 -> monet
        kept_cond = conditioner.encode(["a painting in picasso style", "a painting in monet style"])
        kept_now = conditioner.predict(pipe.unet, latents, timesteps, kept_cond).float()
        erased = objective._loss(steps, rows)
    expected = erased + 3.0 * torch.nn.functional.mse_loss(kept_now, frozen)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)
    assert float(loss - erased) > 1e-6  # the kept term is there


def test_precomputed_targets_cover_the_kept_prompts_training_draws():
    pipe = du.testing.tiny_pipeline(seed=0)
    objective = _objective(pipe, "ca", anchor="plain", keep=["monet", "picasso"])
    computed = objective.precompute_targets(calls=4, batch_size=2)
    assert computed == int(objective._have_target.sum()) + len(objective._preserved_targets)
    predicted = []
    original = objective.context.conditioner.predict
    objective.context.conditioner.predict = lambda *a: predicted.append(torch.is_grad_enabled()) or original(*a)
    for _ in range(4):
        objective.training_loss(2)
    assert predicted == [True] * 4  # one forward pass per step, with gradients: no frozen pass left


def test_a_retain_loss_holds_the_kept_concept_while_the_target_still_moves():
    prompts = {"target": "a painting in van gogh style", "kept": "a painting in monet style"}
    base = {k: generate(du.testing.tiny_pipeline(seed=0), p) for k, p in prompts.items()}

    def change(**options) -> dict[str, float]:
        pipe = du.attach(du.testing.tiny_pipeline(seed=0))
        pipe.unlearn("van gogh", domain="style", seed=3, progress=False, **{**FAST, "steps": 20}, **options)
        return {k: float((generate(pipe, p) - base[k]).abs().mean()) for k, p in prompts.items()}

    free = change()
    held = change(keep=["monet"], keep_weight=10.0)
    print(free, held)
    assert held["kept"] < 0.5 * free["kept"]
    assert held["target"] > 0.5 * free["target"]
