"""Run plans: validation before anything runs, resumable runs (interrupted after a request or during one), refusal
of plans that disagree with the ledger, plans that extend a ledger or start from an unlearned folder."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import pytest

import diffusers_unlearn as du
from diffusers_unlearn.plan import PlanError, load_plan, parse_plan, run_plan

PLAN = """
model: tiny
output: out
defaults: {steps: 3, sampling_steps: 4, num_trajectories: 2, learning_rate: 1e-2}
requests:
  - concept: van gogh
    domain: style
    regularizers: [{name: gradient_projection, keep: [monet]}, {name: l2_drift, weight: 1000}]
  - {concept: dog, domain: object, seed: 1, regularizers: [{name: selective_finetune, top_k: 0.1}]}
  - {concept: cat, domain: object, method: ca, anchor: dog, seed: 2}
"""


def write_plan(folder, text=PLAN, name="plan.yaml"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def final_ledger(output):
    """What must be identical between runs: ids, order, concepts, settings and adapter checksums (not times)."""
    data = json.loads((output / "unlearning" / "ledger.json").read_text())
    keep = ("request_id", "index", "concept", "domain", "method", "method_config", "strategy", "training", "prompts",
            "steps", "seed", "base_fingerprint")
    requests = [{**{k: r[k] for k in keep}, "sha256": r["adapter"]["sha256"],
                 "regularizers": [{k: v for k, v in reg.items() if k != "report"} for reg in r["regularizers"]]}
                for r in data["requests"]]
    return {"next_index": data["next_index"], "requests": requests}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan_a")
    result = run_plan(load_plan(write_plan(folder)), log=None)
    assert result.trained == ["r0001", "r0002", "r0003"] and result.saved
    return folder / "out"


def test_plan_interrupted_after_request_2_and_rerun_ends_with_the_same_ledger(uninterrupted, tmp_path):
    plan_path = write_plan(tmp_path)

    def stop_after_two(planned, record):
        if planned.position == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        run_plan(load_plan(plan_path), log=None, after_request=stop_after_two)
    checkpoint = json.loads((tmp_path / "out" / "unlearning" / "ledger.json").read_text())
    assert [r["request_id"] for r in checkpoint["requests"]] == ["r0001", "r0002"]
    assert not (tmp_path / "out" / "model_index.json").exists()  # the pipeline folder is written at the end

    lines = []
    result = run_plan(load_plan(plan_path), log=lines.append)  # a fresh process would do exactly this
    assert result.skipped == ["r0001", "r0002"] and result.trained == ["r0003"] and result.saved
    assert "already in the ledger as r0001, skipped" in lines[0]
    # equal checksums: in this process the resumed request trains on bit-exact reloaded weights with the same
    # seed and code as in the uninterrupted run, so it is the same computation
    assert final_ledger(tmp_path / "out") == final_ledger(uninterrupted)
    assert result.pipe.removed_concepts == ["van gogh", "dog", "cat"]

    again = run_plan(load_plan(plan_path), log=lines.append)
    assert again.trained == [] and not again.saved and "nothing to do" in lines[-1]
    assert final_ledger(tmp_path / "out") == final_ledger(uninterrupted)


class Crash(du.Regularizer):
    name: ClassVar[str] = "crash"

    def to_dict(self):
        return {"name": self.name}

    def after_step(self, ctx):
        if ctx.step == 1:
            raise KeyboardInterrupt


def test_plan_killed_during_a_request_loses_only_that_request(uninterrupted, tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path))
    pipe = du.load_pipeline("tiny")
    original = pipe.unlearn

    def crash_on_dog(request, **kwargs):  # run_plan hands unlearn() each request's UnlearnRequest
        if request.concept == "dog":
            request.regularizers = [*request.regularizers, Crash()]
        return original(request, **kwargs)

    monkeypatch.setattr(pipe, "unlearn", crash_on_dog)
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, pipe=pipe, log=None)
    checkpoint = json.loads((tmp_path / "out" / "unlearning" / "ledger.json").read_text())
    assert [r["concept"] for r in checkpoint["requests"]] == ["van gogh"]
    result = run_plan(load_plan(tmp_path / "plan.yaml"), log=None)
    assert result.trained == ["r0002", "r0003"]
    assert final_ledger(tmp_path / "out") == final_ledger(uninterrupted)


def test_a_plan_of_recommended_requests_resumes(tmp_path):
    # no method and no training: the closed form on the tiny SD pipeline, whose record lists its solve's report
    # among the regularizers; a rerun still finds the ledger's request equal to the plan's
    plan_path = write_plan(tmp_path, "model: tiny\noutput: out\nrequests:\n  - {concept: cat, domain: object}\n")
    first = run_plan(load_plan(plan_path), log=None)
    assert first.trained == ["r0001"] and first.pipe.unlearning_ledger.requests[0].method == "closed_form"
    again = run_plan(load_plan(plan_path), log=None)
    assert again.skipped == ["r0001"] and again.trained == [] and not again.saved


def test_a_plan_that_disagrees_with_the_ledger_is_refused(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "out")
    changed = PLAN.replace("seed: 1,", "seed: 5,")
    match = r"request 2 \('dog'\) does not match ledger request r0002 \('dog'\): seed is 5"
    with pytest.raises(PlanError, match=match):
        run_plan(load_plan(write_plan(tmp_path, changed)), log=None)
    reordered = PLAN.replace("concept: van gogh", "concept: monet")
    with pytest.raises(PlanError, match=r"request 1 \('monet'\) does not match ledger request r0001 \('van gogh'\)"):
        run_plan(load_plan(write_plan(tmp_path, reordered)), log=None)
    shorter = PLAN[: PLAN.index("  - {concept: cat")]
    with pytest.raises(PlanError, match="holds 3 requests of this plan, but the plan has only 2"):
        run_plan(load_plan(write_plan(tmp_path, shorter)), log=None)
    with pytest.raises(du.LedgerError, match="fingerprint"):
        run_plan(load_plan(write_plan(tmp_path, PLAN.replace("model: tiny", "model: tiny-sdxl"))), log=None)
    assert final_ledger(tmp_path / "out") == final_ledger(uninterrupted)  # nothing changed


def test_an_extended_plan_runs_only_the_new_request(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "out")
    extended = PLAN + "  - {concept: bird, domain: object, seed: 3}\n"
    result = run_plan(load_plan(write_plan(tmp_path, extended)), log=None)
    assert result.skipped == ["r0001", "r0002", "r0003"] and result.trained == ["r0004"]
    ledger = final_ledger(tmp_path / "out")
    assert ledger["requests"][:3] == final_ledger(uninterrupted)["requests"]
    assert json.loads((tmp_path / "out" / "unlearning" / "state.json").read_text())["requests"][-1] == "r0004"


def test_a_plan_can_start_from_an_unlearned_folder(uninterrupted, tmp_path):
    text = f"""
model: {uninterrupted}
output: continued
requests:
  - {{concept: bird, domain: object, steps: 2, sampling_steps: 4, num_trajectories: 2, learning_rate: 1.0e-2}}
"""
    result = run_plan(load_plan(write_plan(tmp_path, text)), log=None)
    assert result.trained == ["r0004"] and result.skipped == []
    continued = final_ledger(tmp_path / "continued")
    assert continued["requests"][:3] == final_ledger(uninterrupted)["requests"]
    assert [r["concept"] for r in continued["requests"]] == ["van gogh", "dog", "cat", "bird"]
    rerun = run_plan(load_plan(tmp_path / "plan.yaml"), log=None)
    assert rerun.trained == [] and rerun.skipped == ["r0004"]
    with pytest.raises(PlanError, match="model and output are the same folder"):
        load_plan(tmp_path / "plan.yaml", output=uninterrupted)


def test_plan_fields_and_paths(tmp_path):
    plan = load_plan(write_plan(tmp_path / "plans"))
    assert plan.model == "tiny" and plan.output == tmp_path / "plans" / "out"  # relative to the plan file
    assert plan.requests[0].training.learning_rate == 1e-2  # "1e-2" is a number, not YAML 1.1's string
    assert plan.requests[2].method_options == {"sampling_steps": 4, "num_trajectories": 2, "anchor": "dog"}
    assert [r.seed for r in plan.requests] == [0, 1, 2]
    override = load_plan(tmp_path / "plans" / "plan.yaml", model="tiny-sdxl", output=tmp_path / "elsewhere")
    assert override.model == "tiny-sdxl" and override.output == tmp_path / "elsewhere"
    merged = parse_plan({"model": "tiny", "output": "o", "strategy": {"method": "ties", "density": 0.4},
                         "requests": [{"concept": "cat"}]})
    assert merged.requests[0].strategy == {"strategy": "merge", "method": "ties", "scale": None, "density": 0.4}


BASE = {"model": "tiny", "output": "o"}


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "a plan is a map"),
        ({**BASE, "requests": [{"concept": "cat"}], "outptu": "x"}, r"unknown field\(s\) \['outptu'\]"),
        ({"output": "o", "requests": [{"concept": "cat"}]}, "'model' must name"),
        ({"model": "tiny", "requests": [{"concept": "cat"}]}, "'output' must name"),
        ({**BASE, "requests": []}, "non-empty list"),
        ({**BASE, "requests": [{"domain": "style"}]}, "request 1: missing 'concept'"),
        ({**BASE, "requests": [{"concept": True}]}, "concept must be a string, got bool True .quote it"),
        ({**BASE, "requests": [{"concept": "cat", "bogus": 1}]}, r"request 1 \('cat'\): .*bogus"),
        ({**BASE, "requests": [{"concept": "cat", "method": "nope"}]}, "unknown method 'nope'"),
        ({**BASE, "requests": [{"concept": "cat", "method": "ca"}]}, "anchor"),
        ({**BASE, "requests": [{"concept": "cat", "steps": 0}]}, "steps must be an integer >= 1"),
        ({**BASE, "requests": [{"concept": "cat", "regularizers": [{"name": "l3"}]}]}, "unknown regularizer"),
        ({**BASE, "requests": [{"concept": "cat", "regularizers": [{"name": "l2_drift", "wieght": 1}]}]},
         r"has no setting\(s\) \['wieght'\]"),
        ({**BASE, "requests": [{"concept": "cat", "regularizers": "l2_drift"}]}, "regularizers must be a list"),
        ({**BASE, "requests": [{"concept": "cat", "domain": "painting"}]}, "unknown domain 'painting'"),
        ({**BASE, "requests": [{"concept": "cat"}, {"concept": "dog", "strategy": "ties"}]}, "mixes"),
        ({**BASE, "strategy": "zigzag", "requests": [{"concept": "cat"}]}, "unknown strategy 'zigzag'"),
        ({**BASE, "defaults": {"concept": "x"}, "requests": [{"concept": "cat"}]}, "cannot set 'concept'"),
        ({**BASE, "requests": [{"concept": "cat", "seed": -1}]}, "seed must be an integer >= 0"),
        ({**BASE, "requests": [{"concept": "cat", "templates": ["no slot"]}]}, "one '{}' slot"),
        ({**BASE, "base_model": "not a hub id", "requests": [{"concept": "cat"}]}, "base_model must be a Hub model id"),
    ],
)
def test_bad_plans_are_refused_before_anything_runs(data, match):
    with pytest.raises(PlanError, match=match):
        parse_plan(data, source="PLAN.yaml")


def test_bad_yaml_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(tmp_path / "missing.yaml")
    bad = write_plan(tmp_path, "model: tiny\nrequests: [\n")
    with pytest.raises(PlanError, match="is not valid YAML"):
        load_plan(bad)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    plan = load_plan(write_plan(tmp_path, PLAN.replace("output: out", "output: foreign")))
    with pytest.raises(ValueError, match="not an unlearned pipeline folder"):
        run_plan(plan, log=None)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
