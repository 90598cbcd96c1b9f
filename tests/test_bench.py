"""The benchmark: protocols on a tiny world (structure, costs, what each protocol trains), the report files, and
``diffusers-unlearn bench --quick`` on the shipped MiniCanvas model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from PIL import Image
from test_evaluation import OBJECTS, STYLES, ChannelClassifier, tiny_config

import diffusers_unlearn as du
from diffusers_unlearn import bench
from diffusers_unlearn.bench.world_recipe import RECOMMENDED_PROTOCOL, TRAINED_PROTOCOL
from diffusers_unlearn.bench.report import headline

HP = bench.Hyperparameters(steps=3, learning_rate=1e-2)


def tiny_world(**overrides) -> bench.BenchWorld:
    values = dict(name="tinyworld", eval_config=tiny_config(seeds=[3], num_inference_steps=3),
                  load_pipeline=lambda: du.testing.tiny_pipeline(0), style_classifier=ChannelClassifier(STYLES),
                  object_classifier=ChannelClassifier(OBJECTS))
    values.update(overrides)
    return bench.BenchWorld(**values)


@pytest.fixture(scope="module")
def result():
    settings = bench.BenchSettings(requests=2, hparams=HP, seed=0)
    return bench.run_bench(tiny_world(), settings, progress=False, log=None, command="pytest")


def check_result_structure(result, requests, protocols):
    """What every results JSON holds, whatever the numbers: shared by the tiny run and `bench --quick`."""
    assert list(result["protocols"]) == protocols
    assert len(result["stream"]) == requests and len(set(result["stream"])) == requests
    for name, protocol in result["protocols"].items():
        rows = protocol["rows"]
        assert [r["request"] for r in rows] == list(range(requests + 1)), name
        assert rows[0]["ua"] is None and rows[0]["drift"] == 0.0 and rows[0]["cumulative_steps"] == 0
        assert [r["concept"] for r in rows[1:]] == result["stream"]
        for row in rows[1:]:
            for metric in ("ua", "ira", "cra"):
                assert 0.0 <= row[metric] <= 100.0, (name, row)
            # the closed-form protocol solves each request: no training steps, but a real change and a real cost
            solved = protocol.get("method", name) == "closed_form"
            assert row["drift"] > 0 and row["seconds"] > 0 and (row["steps"] == 0 if solved else row["steps"] > 0), \
                (name, row)
        for before, after in zip(rows, rows[1:]):
            assert after["cumulative_steps"] == before["cumulative_steps"] + after["steps"]
            assert after["cumulative_seconds"] >= before["cumulative_seconds"]
    steps = result["settings"]["hparams"]["steps"]
    for name, protocol in result["protocols"].items():
        per_request = [r["steps"] for r in protocol["rows"][1:]]
        if name == "simultaneous":  # retrain on all k requests with k x the steps
            assert per_request == [steps * k for k in range(1, requests + 1)]
        elif protocol.get("method", name) == "closed_form":
            assert per_request == [0] * requests
        else:
            assert per_request == [steps] * requests


def test_bench_rows_costs_and_ranges(result):
    check_result_structure(result, 2, list(bench.PROTOCOLS))
    assert result["stream"] == STYLES[:2]
    seq, sim = result["protocols"]["sequential"]["rows"], result["protocols"]["simultaneous"]["rows"]
    assert sim[-1]["cumulative_steps"] > seq[-1]["cumulative_steps"]
    assert result["base"]["ua"] is None and 0 <= result["base"]["ira"] <= 100
    # the first request is the same for sequential and simultaneous (same seed, same prompts, same steps; ESD reads
    # only the prompts, so it is one computation in this process and UA, a count of classified images, is equal)
    assert sim[1]["ua"] == seq[1]["ua"] and sim[1]["drift"] == pytest.approx(seq[1]["drift"], rel=1e-4)
    # drift penalties shrink the change they penalise
    assert result["protocols"]["l2"]["rows"][1]["drift"] < seq[1]["drift"]


def test_report_files(result, tmp_path):
    paths = bench.write_report(result, tmp_path, title="Tiny")
    data = json.loads(paths["json"].read_text())
    assert data["protocols"]["gp"]["rows"] == result["protocols"]["gp"]["rows"]
    text = paths["markdown"].read_text()
    assert text.startswith("## Tiny") and "pytest" in text
    for protocol in result["protocols"].values():
        assert text.count(f"| {protocol['label']} |") == 4  # headline + UA, IRA and CRA per-request tables
    # the verified protocol's requests and what its classifier check sent back, from the rows' erasure figures
    checked = result["protocols"]["closed_form+verify"]["rows"][1:]
    escalated = sum(bool(r["erasure"].get("attempts")) for r in checked)
    # a style starts on its anchor, bounded; an escalated request ends on the rung of the ladder after its attempts
    assert all(r["erasure"]["check"] == "classifier" for r in checked)
    ladder = [{}, *bench.PROTOCOLS["closed_form+verify"].escalate["style"]]
    for r in checked:
        rung = ladder[len(r["erasure"].get("attempts") or [])]
        assert r["erasure"]["settings"] == {"negative_guidance": rung.get("negative_guidance", 0.0),
                                            "ridge": rung.get("ridge", 0.1)}
    assert f"Closed form, verified: the classifier check (2 images per request, seeds apart from the evaluation's) " \
           f"sent back {escalated} of 2 requests" in text
    assert all("check" not in r["erasure"] for r in result["protocols"]["sequential"]["rows"][1:])
    assert "2 style removal requests with `esd`" in text and "Per request: 3 steps" in text
    solved = dict(result, protocols={k: v for k, v in result["protocols"].items() if k.startswith("closed_form")})
    solved_text = bench.markdown(solved)
    assert "2 style removal requests solved in closed form (no training)" in solved_text
    assert "Per request: one closed-form solve" in solved_text and "learning rate" not in solved_text
    table = headline(result)
    assert table[0].startswith("| protocol | UA | IRA | CRA | ΔUA | ΔIRA | ΔCRA |") and len(table) == 2 + len(result["protocols"])
    assert "| Sequential (no regularizer) | " in table[2] and "| +0.0 | +0.0 | +0.0 |" in table[2]
    for key in ("metrics_plot", "cost_plot"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 300


def _replay(protocol_name, requests=2, method="esd", world=None, hparams=HP, **settings):
    world = world or tiny_world()
    world.register_domains()
    config = bench.BenchSettings(requests=requests, hparams=hparams, protocols=[protocol_name], method=method,
                                 **settings)
    stream = world.stream("style", requests)
    pipe = du.attach(world.load_pipeline())
    for k in range(requests):
        bench.serve_request(pipe, bench.PROTOCOLS[protocol_name], world, config, stream, k, progress=False)
    return pipe, world, stream


def test_protocols_train_what_they_say():
    pipe, world, stream = _replay("simultaneous")
    [record] = pipe.unlearning_ledger.requests  # earlier retrainings are rolled back
    assert record.concept == "+".join(stream) and record.steps == 2 * HP.steps
    assert record.prompts == [t.format(c) for c in stream for t in world.templates("style")]
    assert record.method_config["num_trajectories"] == len(record.prompts)

    # ESD's reference (the bench's default: each prompt without its concept) takes every retrained concept out
    assert record.method_config["reference"] == "context" and record.method_config["concepts"] == stream

    pipe, world, stream = _replay("gp+merge")
    records = pipe.unlearning_ledger.requests
    assert [r.strategy["strategy"] for r in records] == ["merge", "merge"]
    assert records[0].domain == "tinyworld-style" and records[0].prompts[0] == "a dog in van gogh style"
    report = records[1].regularizers[0]["report"]
    protected = {(p["concept"], p["domain"], p["source"]) for p in report["protected"]}
    assert ("van gogh", "tinyworld-style", "removed") in protected
    assert all(d in world.vocabulary() for _, d, _ in protected)  # neighbours come from the world's concepts
    # the earlier removal's K/V outputs do not move under the second request
    c = du.concept_embedding(pipe, "van gogh", "tinyworld-style")
    delta = pipe.request_adapter(records[1].request_id)
    base = pipe._unlearning().base_weights
    assert max(float((delta.delta(k) @ c).norm() / (base[k] @ c).norm()) for k in base) < 1e-4

    pipe, _, _ = _replay("gp+selective")
    assert [r.adapter["kind"] for r in pipe.unlearning_ledger.requests] == ["dense", "dense"]
    kept = pipe.unlearning_ledger.requests[0].regularizers[0]["report"]["kept_fraction"]
    assert kept == pytest.approx(HP.gp_selective_top_k, abs=0.01)


def test_concept_ablation_simultaneous_swaps_each_prompts_own_concept():
    pipe, world, stream = _replay("simultaneous", method="ca", anchor="picasso")
    [record] = pipe.unlearning_ledger.requests
    assert record.method == "ca" and list(record.method_config["concepts"]) == stream  # one method, several concepts
    assert record.method_config["anchor"] == "picasso"
    pipe, _, _ = _replay("sequential", method="ca", anchor="picasso")
    assert [r.method for r in pipe.unlearning_ledger.requests] == ["ca", "ca"]
    assert all("concepts" not in r.method_config for r in pipe.unlearning_ledger.requests)
    config = du.CAConfig(anchor="picasso", concepts=("van gogh", "monet"), sampling_steps=2, num_trajectories=2)
    with pytest.raises(ValueError, match="contains none of the concepts"):
        pipe.unlearn("van gogh+monet", config, prompts=["a dog in van gogh style", "a cat"], steps=1)
    with pytest.raises(ValueError, match="anchor 'monet' is one of the concepts"):
        pipe.unlearn("van gogh+monet", "ca", anchor="monet", concepts=("van gogh", "monet"),
                     prompts=["a dog in van gogh style"], steps=1)
    assert len(pipe.unlearning_ledger.requests) == 2  # refused requests change nothing


def test_settings_and_world_refuse_bad_input():
    world = tiny_world()
    assert world.stream("style", len(STYLES)) == STYLES  # every style may go; IRA is then undefined (n/a)
    with pytest.raises(ValueError, match=f"use at most {len(STYLES)}"):
        world.stream("style", len(STYLES) + 1)
    with pytest.raises(ValueError, match="unknown protocol"):
        bench.BenchSettings(protocols="sequential,nope")
    with pytest.raises(ValueError, match="method"):
        bench.BenchSettings(method="uce")
    with pytest.raises(ValueError, match="removal order"):
        tiny_world(orders={"style": ["monet", "klimt"]})
    with pytest.raises(ValueError, match="selective_top_k"):
        bench.Hyperparameters(selective_top_k=0)
    objects = bench.BenchSettings(method="ca", domain="object")
    assert bench.ca_anchor(objects, tiny_world()) == bench.DEFAULT_ANCHORS["object"]
    assert bench.ca_anchor(objects, tiny_world(anchors={"object": "cat"})) == "cat"  # the world's own
    assert bench.ca_anchor(dataclasses.replace(objects, anchor="dog"), tiny_world(anchors={"object": "cat"})) == "dog"
    with pytest.raises(ValueError, match=r"anchor domains must be 'style' / 'object', got \['colour'\]"):
        tiny_world(anchors={"colour": "red"})
    with pytest.raises(ValueError, match=r"anchor 'van gogh' is removed at request 1 of this stream"):
        bench.run_bench(tiny_world(), bench.BenchSettings(method="ca", anchor="van gogh", requests=1, hparams=HP),
                        progress=False, log=None)
    assert bench.family_round_robin({"a": ["a1", "a2"], "b": ["b1"]}) == ["a1", "b1", "a2"]


def test_each_method_trains_with_its_calibrated_settings_unless_told_otherwise():
    assert bench.BenchSettings().hparams == bench.Hyperparameters()  # ESD: the shared defaults
    ca = bench.BenchSettings(method="ca").hparams
    assert ca == bench.Hyperparameters(**bench.METHOD_TRAINING["ca"]["style"]) and ca != bench.Hyperparameters()
    explicit = bench.method_hyperparameters("ca", steps=7)
    assert explicit.steps == 7 and explicit.learning_rate == bench.METHOD_TRAINING["ca"]["style"]["learning_rate"]
    assert bench.BenchSettings(method="ca", hparams=HP).hparams is HP
    # objects: each method's own settings for the domain, a retain loss among them
    for method in ("esd", "ca"):
        objects = bench.BenchSettings(method=method, domain="object").hparams
        assert objects == bench.Hyperparameters(**bench.METHOD_TRAINING[method]["object"])
        assert objects.preserve_weight > 0 and bench.BenchSettings(method=method).hparams.preserve_weight == 0


def test_a_minicanvas_stream_follows_a_chosen_order():
    removal, kept = bench.minicanvas_style_plan()
    order = [kept[3], removal[0], removal[5]]
    world = bench.minicanvas_world(eval_seeds=1, order=order)
    assert world.stream("style", 3) == order
    with pytest.raises(ValueError, match="use at most 3"):
        world.stream("style", 4)
    with pytest.raises(ValueError, match="removal order"):
        bench.minicanvas_world(eval_seeds=1, order=[removal[0], "no such style"])
    with pytest.raises(ValueError, match="order must be a non-empty list"):
        bench.minicanvas_world(eval_seeds=1, order=removal[0])


def test_heldout_wordings_and_per_concept_ua(tmp_path):
    templates = ["{style} painting of a {object}", "a {object}, {style}"]
    world = tiny_world(heldout_templates=templates, heldout_others=1)
    assert bench.heldout_cases(world, ["van gogh"], "style") == [
        ("van gogh", "dog", templates[0], 3), ("van gogh", "dog", templates[1], 3)]
    settings = bench.BenchSettings(requests=2, hparams=HP, protocols=["sequential"], seed=0)
    result = bench.run_bench(world, settings, progress=False, log=None)
    rows = result["protocols"]["sequential"]["rows"]
    assert rows[0]["ua_heldout"] is None and rows[0]["heldout_images"] == 0
    for k, row in enumerate(rows[1:], start=1):
        assert row["heldout_images"] == k * len(templates)  # each removed style x each wording x 1 object
        assert set(row["heldout_accuracy"]) == set(result["stream"][:k])
        assert row["ua_heldout"] == pytest.approx(100 - sum(row["heldout_accuracy"].values()) / k)
    matrix = bench.ua_matrix(result, "sequential")
    assert matrix[1][0] is None  # before its own request a concept has no UA
    assert [matrix[i][1] for i in range(2)] == [100 - rows[2]["accuracy"][c] for c in result["stream"]]
    paths = bench.write_report(result, tmp_path)
    text = paths["markdown"].read_text()
    assert "UA held-out" in text and "### Per-concept UA" in text and "images per style" in text
    with Image.open(paths["ua_matrix_plot"]) as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="held-out template"):
        tiny_world(heldout_templates=["{style} only"])


def wider_world(**overrides) -> bench.BenchWorld:
    """The tiny world with concepts outside its evaluation: what a protocol may be told to keep."""
    values = dict(styles=[*STYLES, "klimt", "dali"], objects=[*OBJECTS, "bird"])
    values.update(overrides)
    return tiny_world(**values)


def test_gradient_projection_protects_the_world_auxiliary_set_by_default():
    world = wider_world(auxiliary={"style": ["klimt"], "object": ["bird"]})
    assert world.vocabulary() == {"tinyworld-style": ["klimt"], "tinyworld-object": ["bird"]}
    # by default the pool is every concept outside the evaluation
    assert wider_world().vocabulary() == {"tinyworld-style": ["klimt", "dali"], "tinyworld-object": ["bird"]}
    assert bench.Hyperparameters().gp_neighbors is None  # all of it, as the paper protects its whole set
    world.register_domains()
    config = bench.BenchSettings(requests=2, hparams=HP, protocols=["gp"])
    stream = world.stream("style", 2)
    pipe = du.attach(world.load_pipeline())
    for k in range(2):
        bench.serve_request(pipe, bench.PROTOCOLS["gp"], world, config, stream, k, progress=False)
    second = pipe.unlearning_ledger.requests[1].regularizers[0]["report"]["protected"]
    assert {(p["concept"], p["source"]) for p in second} == {("van gogh", "removed"), ("klimt", "neighbor"),
                                                             ("bird", "neighbor")}
    # request prompts are written with the objects outside the evaluation only
    assert pipe.unlearning_ledger.requests[0].prompts == ["a bird in van gogh style"]
    with pytest.raises(ValueError, match="auxiliary"):
        tiny_world(auxiliary={"colour": ["red"]})


def test_a_protocol_told_to_keep_an_evaluated_concept_is_refused():
    # the pool may not name a scored concept (monet is a kept style, cat a CRA object)
    for auxiliary in ({"style": ["klimt", "monet"], "object": []}, {"style": [], "object": ["Cat"]}):
        with pytest.raises(ValueError, match="evaluated concepts"):
            wider_world(auxiliary=auxiliary)
    # nor may a request's method or regularizers, whoever built them
    world = wider_world()
    config = bench.BenchSettings(requests=1, hparams=HP, protocols=["gp"])
    kwargs = bench.request_kwargs(world, config, bench.PROTOCOLS["gp"], "van gogh")
    world.check_request(kwargs)  # the bench's own request keeps only unevaluated concepts
    for bad in (dict(regularizers=[du.GradientProjection(keep=["monet"])]),
                dict(method=du.objectives.ClosedFormConfig(keep=["picasso"])),
                dict(method=du.objectives.ClosedFormConfig(vocabulary={"tinyworld-object": ["dog"]}))):
        with pytest.raises(ValueError, match="evaluated concepts"):
            world.check_request({**kwargs, **bad})
    # the split is in every result
    described = world.describe()
    assert described["protected"] == {"tinyworld-style": ["klimt", "dali"], "tinyworld-object": ["bird"]}
    assert described["scored"] == {"style": STYLES, "object": OBJECTS}
    assert not described["request_prompts_use_evaluated"]


def test_a_retain_loss_keeps_the_world_pool_outside_the_evaluation():
    world = wider_world(auxiliary={"style": ["klimt", "dali"], "object": ["bird"]})
    hp = dataclasses.replace(HP, preserve_weight=2.0)
    for protocol in ("sequential", "simultaneous"):
        config = bench.BenchSettings(requests=2, hparams=hp, protocols=[protocol])
        pipe, world, stream = _replay(protocol, world=world, hparams=hp)
        records = pipe.unlearning_ledger.requests
        last = records[-1].method_config
        assert last["keep_weight"] == 2.0
        # the style pool (never an evaluated concept, so never a removal of the stream), in the pool's order
        assert stream == ["van gogh", "monet"] and last["keep"] == ["klimt", "dali"]
        if protocol == "sequential":
            assert records[0].method_config["keep"] == ["klimt", "dali"]
    # the closed form keeps the pool by construction: no retain loss
    kwargs = bench.request_kwargs(world, config, bench.PROTOCOLS["closed_form"], "monet", ["van gogh"])
    solved = kwargs["method"]
    assert not solved.keep and solved.keep_weight == du.objectives.ClosedFormConfig().keep_weight


def test_a_verified_protocol_checks_with_the_world_classifier_on_seeds_apart_from_the_evaluation():
    world = tiny_world()
    config = bench.BenchSettings(requests=1, hparams=HP, protocols=["closed_form+verify"])
    kwargs = bench.request_kwargs(world, config, bench.PROTOCOLS["closed_form+verify"], "van gogh")
    check = kwargs["erasure_check"]
    assert check.classifier is world.style_classifier and check.seeds == [1]
    assert check.templates == world.templates("style") and check.num_inference_steps == 3
    assert kwargs["escalate"] == [{"ridge": 1e-4}, {"ridge": 1e-4, "negative_guidance": 1.0},
                                  {"ridge": 1e-4, "negative_guidance": 2.0}]
    plain = bench.request_kwargs(world, config, bench.PROTOCOLS["closed_form"], "van gogh")
    assert "erasure_check" not in plain
    # the unverified closed form is the library's default: its settings and its escalation (the default check)
    assert plain["escalate"] == [{"ridge": 1e-4}, {"ridge": 1e-4, "negative_guidance": 1.0},
                                 {"ridge": 1e-4, "negative_guidance": 2.0}]
    assert (plain["method"].negative_guidance, plain["method"].ridge, plain["method"].siblings) == (0.0, 0.1, 16)
    assert "escalate" not in bench.request_kwargs(world, config, bench.PROTOCOLS["gp"], "van gogh")
    # checked, a style request keeps more of the rest than the unchecked default; an object request keeps the
    # library's object settings
    assert kwargs["method"].keep_weight == 1.0 and plain["method"].keep_weight == 0.5
    objects = bench.BenchSettings(requests=1, domain="object", hparams=HP, protocols=["closed_form+verify"])
    solved = bench.request_kwargs(world, objects, bench.PROTOCOLS["closed_form+verify"], "dog")["method"]
    assert (solved.keep_weight, solved.negative_guidance) == (5.0, 1.0)
    # object requests are checked by the object classifier, on templates spread over the styles
    two = tiny_world(check_templates=2)
    spread = two.erasure_check("object")
    assert spread.classifier is two.object_classifier
    assert spread.templates == [world.templates("object")[0], world.templates("object")[1]]
    assert tiny_world(check_templates=1).erasure_check("object").templates == [world.templates("object")[0]]
    with pytest.raises(ValueError, match=r"check_seeds must be .* the evaluation does not use \(its seeds: \[3\]\), "
                                         r"got \[3\]"):
        tiny_world(check_seeds=(3,))


def test_minicanvas_style_plan_removes_one_per_family_and_keeps_neighbours():
    from diffusers_unlearn import minicanvas as mc

    removal, kept = bench.minicanvas_style_plan()
    assert len(removal) == len(kept) == len(mc.STYLE_FAMILIES) >= 12
    for removed, neighbour in zip(removal, kept):
        assert removed.split()[0] == neighbour.split()[0] and removed != neighbour  # same family word
    assert len({s.split()[0] for s in removal}) == len(removal)  # consecutive requests hit different families
    assert not set(removal) & set(kept)
    assert bench.minicanvas_style_plan(2) == (removal[:2], kept[:2])
    with pytest.raises(ValueError, match="families"):
        bench.minicanvas_style_plan(0)


# ------------------------------------------------------------------------------------- the command, on MiniCanvas
# Every protocol runs in the tiny bench above; on MiniCanvas, the ones with world-specific inputs (the auxiliary set
# gradient projection protects, the vocabulary the closed-form solve keeps) and the plain baseline.
QUICK_PROTOCOLS = ["sequential", TRAINED_PROTOCOL, RECOMMENDED_PROTOCOL]


def test_bench_quick_on_minicanvas(tmp_path):
    out = tmp_path / "bench"
    removal = bench.minicanvas_style_plan(2)[0]
    proc = subprocess.run([sys.executable, "-m", "diffusers_unlearn.cli", "bench", "--quick", "--quiet",
                           "--protocols", ",".join(QUICK_PROTOCOLS), "--eval-steps", "4", "--jobs", "2",
                           "--order", f"{removal[1]}, {removal[0]}", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    requests = result["settings"]["requests"]
    check_result_structure(result, requests, QUICK_PROTOCOLS)
    from diffusers_unlearn import minicanvas as mc

    assert result["stream"] == [removal[1], removal[0]]  # --order: the plan's two styles, the other way round
    eval_config = result["world"]["eval"]
    # --quick's preset (2 objects, 10 steps) with the explicit --eval-steps winning over it
    assert eval_config["num_inference_steps"] == 4 and len(eval_config["objects"]) == 2
    assert eval_config["styles"] == sum(bench.minicanvas_style_plan(2), [])  # removed styles + kept neighbours
    assert result["base"]["num_images"] == 4 * 2
    assert result["world"]["heldout_templates"] == list(mc.HELDOUT_TEMPLATES)
    assert result["world"]["auxiliary_size"] >= 100
    last = result["protocols"]["sequential"]["rows"][-1]
    assert last["heldout_images"] == requests * len(mc.HELDOUT_TEMPLATES) * 2 and 0 <= last["ua_heldout"] <= 100
    assert 0 <= result["base"]["ira"] <= 100 and 0 <= result["base"]["cra"] <= 100
    text = (out / "results.md").read_text()
    assert "diffusers-unlearn bench --quick" in text and f"--protocols {','.join(QUICK_PROTOCOLS)}" in text
    assert f"### After request {requests}" in text
    assert "| protocol | UA | IRA | CRA |" in proc.stdout  # the headline table is printed too
    for name in ("metrics.png", "cost.png", "ua_matrix.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def test_bench_processes_relaunches_itself_on_that_many_processes(tmp_path, monkeypatch):
    """``--processes N`` runs the same bench under torch.distributed.run (tests/test_distributed.py runs the bench
    on 2 processes and compares it with one)."""
    import os
    from types import SimpleNamespace

    from diffusers_unlearn.cli import bench as bench_command
    from diffusers_unlearn.cli import build_parser, main

    argv = ["bench", "--quick", "--processes", "2", "--protocols", "gp,closed_form", "--quiet", "--gp-neighbors",
            "all", "--lr", "0.01", "--out", str(tmp_path / "out")]
    args = build_parser().parse_args(argv)
    again = bench_command.relaunch_argv(args, bench_command._defaults())
    assert vars(build_parser().parse_args(again)) == vars(args)  # every option survives the relaunch

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: launched.append((command, kw))
                        or SimpleNamespace(returncode=0))
    assert main(argv) == 0
    (command, kw), = launched
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert command[6:8] == ["-m", "diffusers_unlearn.cli"] and command[8:] == again
    assert kw["env"]["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert main(["bench", "--processes", "2", "--jobs", "2", "--out", str(tmp_path / "out")]) == 2
    assert main(["bench", "--processes", "0", "--out", str(tmp_path / "out")]) == 2


# ------------------------------------------------------------------------------------------ mixed streams (--stream)
def test_mixed36_interleaves_30_styles_and_6_objects_in_shared_families():
    from diffusers_unlearn import minicanvas as mc

    stream = bench.get_stream("mixed36")
    assert [d for d, _ in stream.requests].count("style") == 30 and len(stream.requests) == 36
    concepts = [c for _, c in stream.requests]
    assert len(set(concepts)) == 36  # no concept removed twice
    # the stated order: an object at requests 3, 9, ..., 33; the first 12 styles are the 12-request bench's
    assert [k for k, (d, _) in enumerate(stream.requests, start=1) if d == "object"] == [3, 9, 15, 21, 27, 33]
    assert stream.removed("style")[:12] == bench.minicanvas_style_plan()[0]
    removed, kept = stream.removed("style"), stream.kept_concepts("style")
    assert len(kept) == 18 and sorted(removed + kept) == sorted(mc.STYLES)  # every style removed or scored
    for family, members in mc.STYLE_FAMILIES.items():  # removed and kept styles share every family
        assert set(members) & set(removed) and set(members) & set(kept), family
    assert {s.split()[1] for s in removed} == {s.split()[1] for s in kept}  # and every texture word
    # objects: removed, scored and protected parts, disjoint and together all of MiniCanvas's
    objects = [stream.removed("object"), stream.kept_concepts("object"), stream.protected_concepts("object")]
    assert [len(part) for part in objects] == [6, 3, 3] and sorted(sum(objects, [])) == sorted(mc.OBJECTS)
    with pytest.raises(ValueError, match="registered already"):
        bench.register_stream(stream)
    with pytest.raises(ValueError, match="unknown stream 'mixed99'"):
        bench.get_stream("mixed99")


def test_a_stream_refuses_repeats_and_overlapping_sets():
    with pytest.raises(ValueError, match=r"removes \['Monet ', 'monet'\] more than once"):
        bench.Stream("bad", "", (("style", "monet"), ("style", "Monet ")), {})
    with pytest.raises(ValueError, match=r"kept styles \['monet'\] are also removed or scored"):
        bench.Stream("bad", "", (("style", "monet"),), {"style": ("monet",)})
    with pytest.raises(ValueError, match=r"protected objects \['cat'\] are also removed or scored"):
        bench.Stream("bad", "", (("style", "monet"),), {"object": ("cat",)}, {"object": ("cat",)})
    with pytest.raises(ValueError, match="request prompts may not be written with removed or scored"):
        bench.Stream("bad", "", (("style", "monet"),), {"object": ("cat",)}, prompt_concepts={"object": ("cat",)})


def test_the_mixed36_world_scores_only_concepts_no_protocol_keeps():
    stream = bench.get_stream("mixed36")
    world = bench.minicanvas_stream_world("mixed36", eval_seeds=1)
    described = world.describe()
    scored = [*described["scored"]["style"], *described["scored"]["object"]]
    protected = [c for concepts in described["protected"].values() for c in concepts]
    assert not set(scored) & set(protected) and "car" in protected and "neon" in protected
    assert set(scored) == {c for _, c in stream.requests} | {c for d in ("style", "object")
                                                           for c in stream.kept_concepts(d)}
    # kept concepts first: held-out images draw kept concepts of the other domain
    assert world.eval_config.styles[:18] == stream.kept_concepts("style")
    assert world.eval_config.objects[:3] == stream.kept_concepts("object")
    assert not described["request_prompts_use_evaluated"]
    assert described["request_prompt_others"]["style"] == ["car", "flower", "mushroom"]
    assert "neon checks" in described["request_prompt_others"]["object"]
    # both domains' requests go through the bench's engine call, each with its domain's settings
    settings = bench.StreamSettings("mixed36", protocols=["closed_form", "gp"])
    for protocol in ("closed_form", "gp"):
        for domain, concept in (("style", "neon lines"), ("object", "cat")):
            kwargs = bench.request_kwargs(world, settings.for_domain(domain), bench.PROTOCOLS[protocol], concept)
            assert kwargs["domain"] == f"minicanvas-{domain}"
    # request prompts name no scored concept of the other domain
    for domain, other in (("style", "object"), ("object", "style")):
        scored_other = described["scored"][other]
        assert not [t for t in world.templates(domain) if any(f" {c} " in f" {t} " for c in scored_other)]
    solved = bench.request_kwargs(world, settings.for_domain("object"), bench.PROTOCOLS["closed_form"], "cat")
    assert solved["method"].negative_guidance == 1.0  # the library's object settings
    # a protocol told to keep a scored concept is refused
    with pytest.raises(ValueError, match="evaluated concepts"):
        world.check_request({**solved, "method": du.objectives.ClosedFormConfig(preserve=["bear"])})
    with pytest.raises(ValueError, match="evaluated concepts"):
        dataclasses.replace(world, auxiliary={"style": ["neon waves"], "object": []})
    # a pool that names scored concepts loses them: what a protocol keeps is the pool less the stream's concepts
    narrowed = bench.stream_world(bench.minicanvas_world(eval_seeds=1), stream,
                                  auxiliary={"style": ["neon waves", "neon"], "object": ["bear", "car"]})
    assert narrowed.vocabulary() == {"minicanvas-style": ["neon"], "minicanvas-object": ["car", "flower", "mushroom"]}
    with pytest.raises(ValueError, match="retrain every request so far at once"):
        bench.StreamSettings("mixed36", protocols=["simultaneous"])
    assert bench.StreamSettings("mixed36", protocols="closed_form, gp").protocols == ["closed_form", "gp"]


def test_score_stream_counts_each_set_on_its_own_images():
    # styles a, b removed, k kept; objects y removed, x kept; one image per pair, in this order:
    cases = [(s, o, 0) for s in ("a", "b", "k") for o in ("x", "y")]  # (a,x) (a,y) (b,x) (b,y) (k,x) (k,y)
    styles = ["a", "a", "b", "k", "k", "a"]  # a: 2 of 2, b: 1 of 2, k: 1 of 2 (missed in the removed object's image)
    objects = ["x", "y", "z", "y", "x", "x"]  # x: (a,x) and (k,x) of 3; y: (a,y) and (b,y) of 3
    scores = bench.score_stream(cases, styles, objects, {"style": ["a", "b"], "object": ["y"]},
                                {"style": ["k"], "object": ["x"]})
    assert scores["ua_style"] == pytest.approx(100 - (100 + 50) / 2)
    assert scores["ua_object"] == pytest.approx(100 - 100 * 2 / 3)
    assert scores["ua"] == pytest.approx(100 - (100 + 50 + 100 * 2 / 3) / 3)  # every removed concept, both domains
    # a kept concept is scored on its images with kept concepts only: k on (k,x), x on (k,x)
    assert scores["accuracy"]["k"] == pytest.approx(50) and scores["ira"] == pytest.approx(100)
    assert scores["accuracy"]["x"] == pytest.approx(100 * 2 / 3) and scores["cra"] == pytest.approx(100)
    assert scores["cross_removed"] == pytest.approx(50)  # x in the removed styles' images: (a,x) yes, (b,x) no
    assert scores["cross_removed_object"] == pytest.approx(0)  # k in the removed object's image (k,y): no
    with pytest.raises(ValueError, match="both removed and kept"):
        bench.score_stream(cases, styles, objects, {"style": ["a"]}, {"style": ["a"]})


def tiny_stream_world():
    world = wider_world(heldout_templates=["{style} painting of a {object}"], heldout_others=1)
    stream = bench.Stream("tiny3", "two styles and an object", (("style", "van gogh"), ("object", "dog"),
                                                                ("style", "monet")),
                          {"style": ("picasso",), "object": ("cat",)}, {"style": ("klimt",)})
    return bench.stream_world(world, stream), stream


def test_a_tiny_mixed_stream_gives_rows_of_both_domains(tmp_path):
    world, stream = tiny_stream_world()
    assert world.vocabulary() == {"tinyworld-style": ["klimt", "dali"], "tinyworld-object": ["bird"]}
    settings = bench.StreamSettings(stream, protocols=["sequential", "closed_form"], every=2,
                                    hparams={"style": HP, "object": HP})
    result = bench.run_stream_bench(world, settings, progress=False, log=None, command="pytest")
    assert [(r["domain"], r["concept"]) for r in result["requests"]] == list(stream.requests)
    for name, protocol in result["protocols"].items():
        rows = protocol["rows"]
        assert [r["domain"] for r in rows] == [None, "style", "object", "style"]
        assert [r["scored"] for r in rows] == [True, False, True, True]  # every 2nd request and the last
        assert rows[1]["ua"] is None and rows[1]["drift"] > 0  # an unscored request records its cost and drift
        last = rows[-1]
        assert set(last["accuracy"]) == set(world.evaluated())
        assert last["ua"] == pytest.approx(100 - sum(last["accuracy"][c] for c in ("van gogh", "dog", "monet")) / 3)
        assert last["ira"] == pytest.approx(last["kept_accuracy"]["picasso"])
        assert last["heldout_images"] == 3  # each removed concept x 1 wording x 1 kept concept of the other domain
        solved = protocol["method"] == "closed_form"
        assert all((r["steps"] == 0) == solved for r in rows[1:])
    assert result["base_removed"]["ua"] is not None and result["base"]["ua"] is None
    paths = bench.write_stream_report(result, tmp_path, title="Tiny stream")
    assert json.loads(paths["json"].read_text())["protocols"]["sequential"]["rows"] == \
        result["protocols"]["sequential"]["rows"]
    text = paths["markdown"].read_text()
    assert "1. `van gogh`, 2. `dog` (object), 3. `monet`" in text and "IRA over the 1 kept styles `picasso`" in text
    assert "tinyworld-style: `klimt`, `dali`" in text and "### Goals after the whole stream" in text
    assert "| concept | 2 | 3 |" in text and "| 2. dog (object) |" in text  # scored columns only
    for key in ("metrics_plot", "cost_plot", "ua_matrix_plot"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 300


def test_bench_stream_refuses_the_options_it_fixes(tmp_path):
    from diffusers_unlearn.cli import main

    out = str(tmp_path / "out")
    assert main(["bench", "--stream", "mixed36", "--order", "neon lines", "--out", out]) == 2
    assert main(["bench", "--stream", "mixed36", "--domain", "object", "--out", out]) == 2
    assert main(["bench", "--every", "2", "--out", out]) == 2  # --every belongs to --stream
    assert main(["bench", "--stream", "nope", "--out", out]) == 2
