"""objectives/: the registry, config validation, and each method's prompts (what CA pairs with what)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import FAST

import diffusers_unlearn as du
from diffusers_unlearn.objectives import OBJECTIVES, build_objective_config
from diffusers_unlearn.objectives.ca import CAObjective
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
        pipe=pipe, conditioner=du.conditioning.TextConditioner(pipe), unet=pipe.unet, concept=concept,
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
