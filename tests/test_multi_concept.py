"""Several concepts in one request (issue 31, item 2): ``pipe.unlearn([a, b, c], domain=...)`` is one ledger entry
that audit, rollback, save/load, the model card, plans and the command line handle whole; the closed form maps every
concept in one joint solve; a trained method samples every concept in one run; bad lists are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import kv_state

import diffusers_unlearn as du
from diffusers_unlearn.cli import main
from diffusers_unlearn.engine.audit import panel_labels
from diffusers_unlearn.engine.ledger import LedgerError, RequestRecord
from diffusers_unlearn.engine.request import UnlearnRequest
from diffusers_unlearn.families.conditioning import TextConditioner
from diffusers_unlearn.objectives.base import TrajectoryObjective, prompts_by_concept
from diffusers_unlearn.objectives.closed_form import ClosedFormConfig, mapping_keys
from diffusers_unlearn.plan import parse_plan, run_plan
from diffusers_unlearn.plan_format import PlanError, check_plan_fields
from diffusers_unlearn.publishing.model_card import build_model_card

# As in test_closed_form: the tiny pipeline's 32-wide text space keeps room to edit with a small vocabulary.
VOCABULARY = {"style": ["monet", "picasso"], "object": ["cat", "horse"]}
STYLE = dict(method="closed_form", domain="style", vocabulary=VOCABULARY, sampling_steps=4)
OBJECT = dict(method="closed_form", domain="object", vocabulary=VOCABULARY, sampling_steps=4)
THREE = ["van gogh", "dali", "klimt"]
# The fields a one-concept record had before several-concept requests existed, in the order ledger.json wrote them.
ONE_CONCEPT_FIELDS = ["request_id", "index", "concept", "domain", "method", "method_config", "strategy",
                      "regularizers", "adapter", "training", "prompts", "steps", "seed", "seconds", "final_loss",
                      "base_fingerprint", "library_version", "created_at", "timing", "evaluation", "erasure"]


def _pipe():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stream():
    """A one-concept request, then one request of three concepts (tests must not change the pipeline)."""
    pipe = _pipe()
    pipe.unlearn("dog", **OBJECT)
    before = kv_state(pipe)
    pipe.unlearn(THREE, **STYLE)
    return pipe, before


def _mapping_gap(pipe, weights, concept, prompts):
    """||W c - W0 t|| / ||W0 c - W0 t|| over the concept's token pairs on every layer (t: its target, the anchor
    pushed past by the default negative guidance): 1 on the base model, 0 when the concept maps exactly."""
    guidance = ClosedFormConfig().negative_guidance
    keys, targets = mapping_keys(pipe, concept, "", prompts, negative_guidance=guidance)
    base = pipe._unlearning().base_weights
    num = sum(float((keys @ weights[n].T - targets @ w.double().T).square().sum()) for n, w in base.items())
    den = sum(float(((keys - targets) @ w.double().T).square().sum()) for n, w in base.items())
    return (num / den) ** 0.5


def _weights(pipe, ids):
    state = pipe._unlearning()
    return {n: w.double() + sum((state.artifacts[i].delta(n).double() for i in ids), torch.zeros_like(w.double()))
            for n, w in state.base_weights.items()}


def test_a_request_of_three_concepts_is_one_ledger_entry_that_lists_them(stream):
    pipe, _ = stream
    assert pipe.unlearning_ledger.ids() == ["r0001", "r0002"]
    record = pipe.unlearning_ledger.requests[1]
    assert record.concepts == tuple(THREE) and record.concept == "van gogh, dali, klimt"
    assert pipe.removed_concepts == ["dog", *THREE]
    # template by template, each filled with every concept in turn
    assert record.prompts[:3] == [du.TEMPLATES["style"][0].format(c) for c in THREE]
    assert len(record.prompts) == 3 * len(du.TEMPLATES["style"])
    report = record.regularizers[0]["report"]
    assert report["mapped_concepts"] == 3 and report["earlier_mapped"] == 1  # "dog" stays mapped
    assert not {c.lower() for c in THREE} & {c.lower() for c in report["protected"]}
    # the erasure check measured each concept; the request is erased only if all are
    per = record.erasure["concepts"]
    assert list(per) == THREE and record.erasure["erased"] == all(f["erased"] for f in per.values())
    assert record.erasure["worst"] == min(THREE, key=lambda c: per[c]["target_shift"])
    # audit and the model card name every concept
    labels = panel_labels(pipe, "r0002")
    assert all(c in labels["only"] for c in THREE)
    card = build_model_card(pipe.unlearning_ledger, base_model=None, pipeline_class="StableDiffusionPipeline")
    assert card.data.removed_concepts == ["dog", *THREE]
    assert card.data.unlearning["requests"][1]["concepts"] == THREE
    assert "concepts" not in card.data.unlearning["requests"][0]
    assert "van gogh, dali, klimt" in card.text


def test_the_closed_form_maps_every_concept_jointly_and_keeps_what_it_protects(stream):
    pipe, _ = stream
    record = pipe.unlearning_ledger.requests[1]
    base = {n: w.double() for n, w in pipe._unlearning().base_weights.items()}
    after, before = _weights(pipe, ["r0001", "r0002"]), _weights(pipe, ["r0001"])
    groups = prompts_by_concept(record.prompts, THREE)
    # the same three as one request each, in a stream after "dog"
    single = _pipe()
    single.unlearn("dog", **OBJECT)
    for concept in THREE:
        single.unlearn(concept, **STYLE)
    streamed = _weights(single, single.unlearning_ledger.ids())
    for concept in THREE:
        assert _mapping_gap(pipe, base, concept, groups[concept]) == pytest.approx(1.0)
        # "dog" alone does not map the styles; the joint solve moves each of the three towards its target (the
        # 32-wide text space, its 20 protected directions and the soft penalty leave a residual: 0.55-0.69 here)
        assert _mapping_gap(pipe, before, concept, groups[concept]) > 0.9
        gap = _mapping_gap(pipe, after, concept, groups[concept])
        assert gap < 0.75, concept
        # and exactly as far as three requests in a row: each closed-form request solves everything mapped so far
        # from the base, so one joint request is the stream's last (float32 factors apart)
        assert gap == pytest.approx(_mapping_gap(single, streamed, concept, groups[concept]), abs=1e-5), concept
    # the empty prompt and the kept concepts' average embeddings keep their base outputs exactly (float32 factors)
    empty = TextConditioner(pipe).encode_unconditional(1).hidden_states[0].double()
    kept = torch.stack([du.concept_embedding(pipe, c, d).double() for d, cs in VOCABULARY.items() for c in cs])
    vectors = torch.cat([empty, kept])
    delta = pipe.request_adapter("r0002").deltas()
    for name, d in delta.items():
        moved = (vectors @ d.double().T).norm(dim=1)
        assert torch.all(moved <= 1e-5 * d.double().norm() * vectors.norm(dim=1)), name


def test_save_and_load_of_a_several_concept_entry_is_bit_exact(stream, tmp_path):
    pipe, _ = stream
    pipe.save_unlearning(tmp_path / "a")
    data = json.loads((tmp_path / "a" / "ledger.json").read_text())
    assert list(data["requests"][0]) == ONE_CONCEPT_FIELDS  # a one-concept record is written as it always was
    assert list(data["requests"][1]) == [*ONE_CONCEPT_FIELDS, "concepts"]
    assert data["requests"][1]["concepts"] == THREE
    fresh = _pipe()
    fresh.load_unlearning(tmp_path / "a")
    assert fresh.unlearning_ledger.requests == pipe.unlearning_ledger.requests
    assert fresh.removed_concepts == pipe.removed_concepts
    for request_id in pipe.unlearning_ledger.ids():
        mine, theirs = pipe.request_adapter(request_id).tensors, fresh.request_adapter(request_id).tensors
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    fresh.save_unlearning(tmp_path / "b")
    for path in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


def test_a_one_concept_record_of_an_earlier_version_loads_and_compares_equal(stream):
    pipe, _ = stream
    record = pipe.unlearning_ledger.requests[0]
    data = json.loads(json.dumps(record.to_dict()))
    assert list(data) == ONE_CONCEPT_FIELDS
    loaded = RequestRecord.from_dict(data)
    assert loaded == record and loaded.concepts == ("dog",)
    assert RequestRecord.from_dict(data).to_dict() == data


@pytest.mark.parametrize("concepts, match", [
    ("van gogh", "concepts must be a list of at least 2"),
    ([], "concepts must be a list of at least 2"),
    (["van gogh"], "concepts must be a list of at least 2"),
    (["van gogh", 3], "concepts must be a list of at least 2"),
    (["van gogh", "Van  Gogh"], "concepts must be a list of at least 2"),
    (["van gogh", "dali", "klimt "], "concepts must be a list of at least 2"),
    (["van gogh", "dali"], r"concept must be the label of its concepts 'van gogh, dali', got 'van gogh, dali, kl"),
])
def test_a_record_with_bad_concepts_is_refused(stream, concepts, match):
    pipe, _ = stream
    data = json.loads(json.dumps(pipe.unlearning_ledger.requests[1].to_dict()))
    data["concepts"] = concepts
    with pytest.raises(LedgerError, match=match):
        RequestRecord.from_dict(data, "ledger.json: requests[1]")


def test_rollback_of_a_several_concept_entry_restores_the_weights_before_it(tmp_path):
    pipe = _pipe()
    pipe.unlearn("dog", **OBJECT)
    before = kv_state(pipe)
    request_id = pipe.unlearn(THREE, **STYLE).request_id
    assert any(not torch.equal(before[k], v) for k, v in kv_state(pipe).items())
    dropped = pipe.rollback(request_id)
    assert dropped.concepts == tuple(THREE)
    after = kv_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.removed_concepts == ["dog"]
    assert pipe.unlearning_ledger.history[-1]["concepts"] == THREE


def test_rollback_of_a_several_concept_entry_re_solves_the_later_closed_form_request():
    pipe = _pipe()
    first = pipe.unlearn(THREE, **STYLE).request_id
    later = pipe.unlearn("dog", **OBJECT)
    assert later.regularizers[0]["report"]["earlier_mapped"] == 3  # every concept of the earlier entry stays mapped
    pipe.rollback(first)
    assert pipe.unlearning_ledger.history[-1]["resolved"] == [later.request_id]
    fresh = _pipe()
    alone = fresh.request_adapter(fresh.unlearn("dog", **OBJECT).request_id).deltas()
    resolved = pipe.request_adapter(later.request_id).deltas()
    for name, delta in alone.items():  # the same solve on the same inputs: float32 factor rounding apart
        torch.testing.assert_close(resolved[name], delta, rtol=0, atol=1e-5 * float(delta.abs().max()))


def test_a_trained_request_samples_every_concept_in_one_run(monkeypatch):
    sampled: list[list[str]] = []
    prepare = TrajectoryObjective.prepare

    def spy(self):
        prepare(self)
        prompts = self.sampling_prompts()
        sampled.append([prompts[int(i)] for i in self.rows_prompt])

    monkeypatch.setattr(TrajectoryObjective, "prepare", spy)
    pipe = _pipe()
    record = pipe.unlearn(THREE, method="esd", domain="style", reference="context", steps=6, sampling_steps=4,
                          num_trajectories=2, learning_rate=1e-2, seed=0)
    assert len(sampled) == 1  # one run
    # num_trajectories rose to a multiple of the 3 concepts: one trajectory of each
    assert record.method_config["num_trajectories"] == 3 and record.steps == 6
    assert sorted(prompts_by_concept(sampled[0], THREE)) == sorted(THREE)
    assert [len(ps) for ps in prompts_by_concept(sampled[0], THREE).values()] == [1, 1, 1]
    # and the one adapter moved each concept's prediction (the erasure check, measured per concept)
    assert list(pipe.unlearning_ledger.ids()) == ["r0001"]
    assert all(record.erasure["concepts"][c]["target_shift"] > 0.05 for c in THREE), record.erasure["concepts"]


def test_a_plan_request_may_list_several_concepts(tmp_path):
    data = {"model": "tiny", "output": str(tmp_path / "out"), "requests": [
        {"concept": ["van gogh", "dali"], **STYLE}, {"concept": "dog", **OBJECT}]}
    plan = parse_plan(data)
    assert plan.requests[0].concept == ("van gogh", "dali") and plan.requests[1].concept == "dog"
    result = run_plan(plan, pipe=_pipe(), log=None, progress=False)
    records = result.pipe.unlearning_ledger.requests
    assert [r.concepts for r in records] == [("van gogh", "dali"), ("dog",)]
    again = run_plan(parse_plan(data), pipe=_pipe(), log=None, progress=False)  # resumes: the signatures match
    assert again.trained == [] and again.skipped == ["r0001", "r0002"]
    changed = {**data, "requests": [{"concept": ["van gogh", "klimt"], **STYLE}, {"concept": "dog", **OBJECT}]}
    with pytest.raises(PlanError, match="request 1 \\('van gogh, klimt'\\) does not match ledger request r0001"):
        run_plan(parse_plan(changed), pipe=_pipe(), log=None, progress=False)


@pytest.mark.parametrize("concept, match", [
    ([], "concept must be a string, got list .*a non-empty list of strings"),
    (["cat", 3], "concept must be a string, got list .*a non-empty list of strings"),
    (["cat", "Cat"], "concept lists 'Cat' twice"),
])
def test_a_plan_with_a_bad_concept_list_is_refused(concept, match, tmp_path):
    data = {"model": "tiny", "output": str(tmp_path / "out"), "requests": [{"concept": concept, "domain": "style"}]}
    with pytest.raises(PlanError, match=match):
        check_plan_fields(data, source="plan", method_fields=lambda _: None)
        parse_plan(data)


def test_the_command_line_removes_several_concepts_in_one_request(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["unlearn", "tiny", "--concept", "van gogh, dali", "--concept", "klimt", "--domain", "style",
                 "--method", "closed_form", "--option", "sampling_steps=4",
                 "--option", "vocabulary={style: [monet, picasso], object: [cat, horse]}", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "removed 'van gogh, dali, klimt' as r0001" in printed
    records = du.load_pipeline(out).unlearning_ledger.requests
    assert [r.concepts for r in records] == [tuple(THREE)]


def test_the_command_line_checks_each_concept_against_the_world(tmp_path, capsys):
    assert main(["unlearn", "minicanvas", "--concept", "neon lines,neon linez", "--domain", "style",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "'neon linez' is not a minicanvas style" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("concept, error, match", [
    ([], ValueError, "concept must be a non-empty string or a non-empty list of strings, got \\[\\]"),
    (["van gogh", " Van  Gogh"], ValueError, "concept lists 'Van  Gogh' twice"),
    (["van gogh", 3], TypeError, "each concept must be a string, got int: 3"),
    (["van gogh", "  "], ValueError, "each concept must be a non-empty string"),
    (("van gogh", None), TypeError, "each concept must be a string, got NoneType"),
    ({"van gogh"}, TypeError, "concept must be a string or a list of strings, got set"),
])
def test_bad_concept_lists_are_refused_before_any_work(concept, error, match):
    pipe = _pipe()
    before = kv_state(pipe)
    with pytest.raises(error, match=match):
        pipe.unlearn(concept, **STYLE)
    assert pipe.unlearning_ledger.requests == []
    assert all(torch.equal(before[k], v) for k, v in kv_state(pipe).items())


def test_a_request_of_several_concepts_checks_its_other_fields():
    with pytest.raises(ValueError, match="anchor 'dali' is one of the concepts being removed"):
        UnlearnRequest.build(THREE, "closed_form", domain="style", anchor="dali")
    with pytest.raises(ValueError, match="keep names 'klimt', the concept this request removes"):
        UnlearnRequest.build(THREE, "closed_form", domain="style", keep=["klimt"])
    with pytest.raises(ValueError, match=r"prompts must name every concept of the request; none names \['klimt'\]"):
        UnlearnRequest.build(THREE, "closed_form", prompts=["a van gogh cup", "a dali cup"])
    one = UnlearnRequest.build(["van gogh"], "closed_form", domain="style")  # a list of one is that concept
    assert one == UnlearnRequest.build("van gogh", "closed_form", domain="style") and one.concepts == ("van gogh",)
    several = UnlearnRequest.build(THREE, "closed_form", domain="style")
    assert dataclasses.replace(several, prompts=None) == several  # escalation rebuilds requests this way
    assert several.signature()["concepts"] == THREE


def test_gradient_projection_protects_none_of_the_request_s_concepts():
    pipe = _pipe()
    pipe.unlearn("dog", **OBJECT)
    projection = du.GradientProjection(vocabulary=["dali", "klimt", "monet", "picasso"], neighbors=4)
    record = pipe.unlearn(THREE, method="esd", domain="style", steps=2, sampling_steps=2, num_trajectories=3,
                          regularizers=[projection])
    protected = [p["concept"] for p in record.regularizers[0]["report"]["protected"]]
    assert "dog" in protected and {"monet", "picasso"} <= set(protected)  # earlier removal and neighbours kept
    assert not set(THREE) & set(protected)  # none of the concepts being removed
    with pytest.raises(ValueError, match="cannot keep 'klimt'"):  # refused before any work
        pipe.unlearn(THREE, domain="style", steps=2, regularizers=[du.GradientProjection(keep=["klimt"])])
    assert pipe.unlearning_ledger.ids() == ["r0001", "r0002"]
