"""request.py: one validated description of a request, built the same way by unlearn(), plans and the CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST

import diffusers_unlearn as du
from diffusers_unlearn.plan import PlanError, parse_plan
from diffusers_unlearn.engine.request import UnlearnRequest, record_signature, resolve_request
from diffusers_unlearn.worlds import WorldRecipe

OPTIONS = dict(steps=FAST["steps"], learning_rate=FAST["learning_rate"], sampling_steps=FAST["sampling_steps"],
               num_trajectories=FAST["num_trajectories"])


def test_a_request_is_normalised_on_construction():
    request = UnlearnRequest.build("  van gogh ", domain="style", seed=3, regularizers=du.L2Drift(weight=1.0),
                                   rank="full", negative_guidance=2.0)
    assert request.concept == "van gogh" and request.domain == "style" and request.seed == 3
    assert isinstance(request.method, du.ESDConfig) and request.method.negative_guidance == 2.0
    assert request.training.rank == "full" and request.strategy == "sequential"
    assert request.templates == du.TEMPLATES["style"]
    assert request.prompts == [t.format("van gogh") for t in du.TEMPLATES["style"]]
    assert [type(r) for r in request.regularizers] == [du.L2Drift]
    explicit = UnlearnRequest("cat", "esd", prompts=("a cat", "a small cat"), templates=["ignored {}"])
    assert explicit.prompts == ["a cat", "a small cat"] and explicit.templates is None
    assert explicit.domain == "concept"  # the default domain


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((" ",), {}, ValueError, "concept must be a non-empty string"),
        ((3,), {}, TypeError, "concept must be a string"),
        (("cat", "nope"), {}, ValueError, r"unknown method 'nope'; known methods: \['ca', 'closed_form', 'esd'"),
        (("cat",), dict(domain="nope"), ValueError, "unknown domain 'nope'"),
        (("cat",), dict(seed=-1), ValueError, "seed must be an integer >= 0"),
        (("cat",), dict(seed=True), ValueError, "seed must be an integer >= 0"),
        (("cat",), dict(steps=0), ValueError, "steps must be an integer >= 1"),
        (("cat",), dict(training="fast"), TypeError, "training must be a du.TrainingConfig"),
        (("cat",), dict(prompts="a cat"), ValueError, "prompts must be a non-empty list"),
        (("cat",), dict(templates=["no slot"]), ValueError, "exactly one '{}' slot"),
        (("cat",), dict(strategy="nope"), ValueError, "unknown strategy 'nope'"),
        (("cat",), dict(regularizers=[du.L2Drift(), du.L2Drift()]), ValueError, "repeated: \\['l2_drift'\\]"),
        (("cat", "ca"), {}, ValueError, "needs an anchor"),
        (("cat", "esd"), dict(anchor="dog"), TypeError, r"method 'esd' has no option\(s\) \['anchor'\]"),
    ],
)
def test_bad_requests_are_refused_naming_the_value(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        UnlearnRequest.build(*args, **kwargs)


def test_a_ready_request_trains_like_its_keywords_and_its_signature_matches_the_record():
    by_keywords = du.attach(du.testing.tiny_pipeline(seed=0))
    record = by_keywords.unlearn("van gogh", domain="style", seed=1, regularizers=[du.L2Drift(weight=1.0)], **OPTIONS)
    request = UnlearnRequest.build("van gogh", domain="style", seed=1, regularizers=[du.L2Drift(weight=1.0)], **OPTIONS)
    ready = du.attach(du.testing.tiny_pipeline(seed=0))
    same = ready.unlearn(request, progress=False)
    a, b = by_keywords.request_adapter(record.request_id), ready.request_adapter(same.request_id)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # the same computation, bit for bit
    assert record_signature(same) == request.signature() == record_signature(record)
    with pytest.raises(TypeError, match=r"got a ready UnlearnRequest and also \['method', 'steps'\]"):
        ready.unlearn(request, "ca", steps=3)
    retains_itself = UnlearnRequest.build("cat", regularizers=[du.GradientProjection(keep=["Cat"])])
    with pytest.raises(ValueError, match="cannot keep 'Cat': it is the concept being removed"):
        ready.unlearn(retains_itself)
    assert ready.unlearning_ledger.ids() == [same.request_id]


def test_a_plan_request_is_checked_as_unlearn_checks_it():
    plan = {"model": "tiny", "output": "out", "requests": [{"concept": "cat", "seed": -1}]}
    with pytest.raises(PlanError, match=r"plan: request 1 \('cat'\): seed must be an integer >= 0 \(at most 2\*\*63 - 1\), got -1"):
        parse_plan(plan)
    plan["requests"] = [{"concept": "cat", "regularizers": [{"name": "l2_drift", "weight": -1}]}]
    with pytest.raises(PlanError, match=r"request 1 \('cat'\): .*weight"):
        parse_plan(plan)  # refused when the plan is read, not when its request comes up
    plan["requests"] = [{"concept": "cat", "domain": "object", "steps": 2, "anchor": "dog", "method": "ca"}]
    [planned] = parse_plan(plan).requests
    request = planned.to_request()
    assert isinstance(request.method, du.CAConfig) and request.method.anchor == "dog"
    assert request.training.steps == 2 and request.prompts == [t.format("cat") for t in du.TEMPLATES["object"]]
    assert planned.signature() == request.signature()


# ------------------------------------------------------------------------------------------------ keep=
def test_keep_is_one_way_to_name_what_survives_for_every_method():
    solved = UnlearnRequest.build("van gogh", "closed_form", domain="style", keep=["monet", "klimt"])
    assert solved.method.keep == ["monet", "klimt"] and solved.method.vocabulary is None
    # another domain's concepts join the closed form's vocabulary, over the built-in one
    mixed = UnlearnRequest.build("van gogh", "closed_form", domain="style", keep={"style": ["monet"],
                                                                                 "object": ["cat", "kettle"]})
    assert mixed.method.keep == ["monet"]
    assert mixed.method.vocabulary["object"][-1] == "kettle"
    assert set(du.vocabulary.DEFAULT_VOCABULARY["style"]) <= set(mixed.method.vocabulary["style"])
    # gradient projection retains them; a trained method without it keeps them in its retain loss
    projected = UnlearnRequest.build("van gogh", "esd", domain="style", keep=["monet"],
                                     regularizers=[du.GradientProjection(keep=["klimt"]), du.L2Drift(weight=1.0)])
    assert projected.regularizers[0].keep == ["klimt", "monet"] and not projected.method.keep
    trained = UnlearnRequest.build("van gogh", "esd", domain="style", keep=["monet"])
    assert trained.method.keep == ("monet",)
    for keep, error, match in ((["van gogh"], ValueError, "the concept this request removes"),
                               ("monet", TypeError, "got the string"),
                               ({"nope": ["x"]}, ValueError, "unknown domain 'nope'"),
                               ([""], ValueError, "keep concept must be a non-empty string")):
        with pytest.raises(error, match=match):
            UnlearnRequest.build("van gogh", "closed_form", domain="style", keep=keep)


@pytest.mark.parametrize("method, options", [
    ("closed_form", dict(vocabulary=[])),  # only what keep names (the built-in 70 fill the tiny 32-wide space)
    ("esd", dict(regularizers=[du.GradientProjection(neighbors=0)], **OPTIONS)),
])
def test_a_kept_concept_keeps_its_kv_outputs_exactly(pipe, method, options):
    record = pipe.unlearn("van gogh", method, domain="style", seed=0, keep=["monet"], **options)
    artifact = pipe.request_adapter(record.request_id)
    base = pipe._unlearning().base_weights

    def change(vector):  # max over K/V layers of ||dW c|| / ||W c||
        return max(float((artifact.delta(n) @ vector).norm() / (base[n] @ vector).norm()) for n in artifact.layers)

    kept = change(du.concept_embedding(pipe, "monet", "style"))
    moved = change(du.concept_embedding(pipe, "van gogh", "style"))
    assert kept < 1e-4 and moved > 1e-2, (kept, moved)


def test_keep_in_a_plan_and_on_the_command_line_builds_the_same_request():
    plan = parse_plan({"model": "tiny", "output": "out", "requests": [
        {"concept": "van gogh", "domain": "style", "method": "closed_form", "keep": ["monet"]},
        {"concept": "cat", "domain": "object", "method": "esd", "keep": {"object": ["dog"], "style": ["monet"]},
         "regularizers": [{"name": "gradient_projection"}]},
    ]})
    first, second = (r.to_request() for r in plan.requests)
    assert first.signature() == UnlearnRequest.build("van gogh", "closed_form", domain="style",
                                                     keep=["monet"]).signature()
    assert first.method.keep == ["monet"]
    assert second.regularizers[0].keep == ["dog", "monet"]
    for keep, match in ((["van gogh"], "the concept this request removes"), ("monet", "got the string")):
        with pytest.raises(PlanError, match=match):
            parse_plan({"model": "tiny", "output": "out", "requests": [
                {"concept": "van gogh", "domain": "style", "method": "closed_form", "keep": keep}]})
    from diffusers_unlearn.cli import build_parser
    from diffusers_unlearn.cli.unlearn import build_request, request_inputs

    args = build_parser().parse_args(["unlearn", "tiny", "--concept", "van gogh", "--domain", "style", "--method",
                                      "closed_form", "--keep", "monet, klimt", "--keep", "dali", "--out", "x"])
    inputs, _ = request_inputs(args)
    assert inputs["keep"] == ["monet", "klimt", "dali"]
    assert build_request(args, inputs).method.keep == ["monet", "klimt", "dali"]


# ------------------------------------------------------------------------------------------------ resolve_request
def recipe(**kwargs):
    """A world's recipe: ESD with guidance 3 on style prompts, 7 steps, an L2 drift, a retain pool of three."""
    unlearn_kwargs = dict(method=du.ESDConfig(negative_guidance=3.0), domain="style", steps=7,
                          regularizers=[du.L2Drift(weight=2.0)], strategy="sequential")
    return WorldRecipe({**unlearn_kwargs, **kwargs}, preserve=["monet", "klimt", "van gogh"], preserve_weight=0.5)


def test_each_part_of_a_request_comes_from_the_caller_then_the_world_recipe_then_the_defaults():
    served = resolve_request("van gogh", world_recipe=recipe())
    assert served.method.negative_guidance == 3.0 and served.domain == "style" and served.training.steps == 7
    assert [r.to_dict() for r in served.regularizers] == [du.L2Drift(weight=2.0).to_dict()]
    # the recipe's retain pool, less the concept and the earlier removals
    assert served.method.keep == ("monet", "klimt") and served.method.keep_weight == 0.5
    assert resolve_request("van gogh", world_recipe=recipe(), removed=["Klimt"]).method.keep == ("monet",)
    # the caller's values win, part by part
    with pytest.warns(FutureWarning, match="`preserve` is deprecated"):  # the method's option under its former name
        own = resolve_request("van gogh", world_recipe=recipe(), negative_guidance=1.0, steps=3, regularizers=[],
                              preserve=["dali"])
    assert own.method.negative_guidance == 1.0 and own.training.steps == 3 and own.regularizers == []
    assert own.method.keep == ("dali",)  # a retain list given is not the recipe's
    assert resolve_request("van gogh", world_recipe=recipe(), training=du.TrainingConfig(steps=5)).training.steps == 5
    named = resolve_request("van gogh", "ca", world_recipe=recipe(), anchor="a painting")
    assert named.method.method == "ca" and named.method.keep == ("monet", "klimt")
    solved = resolve_request("van gogh", world_recipe=recipe(method=du.objectives.ClosedFormConfig(), regularizers=[]))
    assert solved.method.method == "closed_form"  # no retain loss to add to a solved method
    # no recipe: the defaults (the recommended method with its object settings, or the trained one)
    recommended = dict(max_kept_fraction=0.75, keep_weight=5.0, negative_guidance=1.0, ridge=0.1, siblings=16,
                       sibling_weight=8.0)
    assert resolve_request("cat", domain="object").method == resolve_request("cat", "closed_form", **recommended).method
    assert resolve_request("cat", steps=3).method.method == "esd"
    with pytest.raises(TypeError, match="a world recipe sets only"):
        resolve_request("cat", world_recipe=recipe(prompts=["a cat"]))
    with pytest.raises(TypeError, match=r"options \['anchor'\] given together with a ready ESDConfig"):
        resolve_request("cat", du.ESDConfig(), anchor="dog")


def test_unlearn_a_plan_and_the_command_line_resolve_the_same_request(pipe):
    from diffusers_unlearn.cli import build_parser
    from diffusers_unlearn.cli.unlearn import build_request, request_inputs
    from diffusers_unlearn.families.registry import family_of

    from diffusers_unlearn.engine.defaults import recommended_escalation
    from diffusers_unlearn.engine.escalation import escalated_requests

    record = pipe.unlearn("cat", domain="object", keep=["dog"], seed=2, progress=False)
    resolved = resolve_request("cat", domain="object", keep=["dog"], seed=2, family=family_of(pipe))
    expected = resolved.signature()
    # the record is the resolved request, or the recommended escalation's step the erasure check stopped at
    ladder = escalated_requests(resolved, recommended_escalation("object", "closed_form"))
    assert record_signature(record) == ladder[len(record.erasure.get("attempts") or [])].signature()
    assert record.method == "closed_form" and resolved.method.negative_guidance == 1.0
    [planned] = parse_plan({"model": "tiny", "output": "out", "requests": [
        {"concept": "cat", "domain": "object", "keep": ["dog"], "seed": 2}]}).requests
    assert planned.to_request(family_of(pipe)).signature() == expected
    args = build_parser().parse_args(["unlearn", "tiny", "--concept", "cat", "--domain", "object", "--keep", "dog",
                                      "--seed", "2", "--out", "x"])
    assert build_request(args, request_inputs(args)[0], family_of(pipe)).signature() == expected
