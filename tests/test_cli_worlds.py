"""Named worlds in every subcommand, the MiniCanvas recipe on the command line, --help without heavy imports,
registries behind the CLI's choices and errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn.cli import build_parser, main
from diffusers_unlearn.cli.unlearn import build_request, request_inputs
from diffusers_unlearn.worlds import WORLDS, World, get_world, register_world, world_names


def registered_commands() -> list[str]:
    parser = build_parser()
    return sorted(next(a for a in parser._actions if a.dest == "command").choices)


def test_help_of_every_subcommand_imports_no_heavy_library():
    # --help must answer at once: it may not import torch, diffusers or transformers (checked in a fresh process,
    # since this one has them loaded already). No timing: the imports are what makes it slow.
    code = (
        "import sys\n"
        "from diffusers_unlearn.cli import main\n"
        f"for command in {[[]] + [[c] for c in registered_commands()]!r}:\n"
        "    try:\n"
        "        main([*command, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (command, exit.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout
    assert result.stdout.count("usage: diffusers-unlearn") == len(registered_commands()) + 1


def test_import_of_the_package_is_lazy_and_exports_still_resolve():
    code = ("import sys, diffusers_unlearn as du\n"
            "assert 'torch' not in sys.modules, 'import diffusers_unlearn loaded torch'\n"
            "assert du.worlds.world_names() and 'torch' not in sys.modules\n")  # a light submodule, on first use
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(du.__all__) <= set(dir(du))
    for name in du.__all__:  # every public name still resolves (here, where torch is loaded anyway)
        assert getattr(du, name) is not None
    from diffusers_unlearn import L2Drift, load_pipeline  # noqa: F401 - from-imports go through __getattr__ too

    assert du.minicanvas.STYLES and du.testing.tiny_pipeline


def test_help_defaults_are_read_from_the_dataclasses():
    from diffusers_unlearn.bench import METHOD_TRAINING, PROTOCOLS, BenchSettings, Hyperparameters
    from diffusers_unlearn.cli._common import dataclass_defaults, module_constant
    from diffusers_unlearn.cli.bench import _by_method, _protocol_names

    literal = dataclass_defaults("bench/protocols.py", "Hyperparameters")
    real = {f.name: f.default for f in dataclasses.fields(Hyperparameters)}
    assert literal and literal == {k: v for k, v in real.items() if k in literal}
    assert dataclass_defaults("bench/runner.py", "BenchSettings")["negative_guidance"] == BenchSettings().negative_guidance
    assert dataclass_defaults("bench/runner.py", "BenchSettings")["reference"] == BenchSettings().reference
    # the per-method training defaults shown in --help are the ones the bench uses
    assert module_constant("bench/protocols.py", "METHOD_TRAINING") == METHOD_TRAINING
    assert _by_method("steps") == (f"; esd object: {METHOD_TRAINING['esd']['object']['steps']}; "
                                   f"ca style: {METHOD_TRAINING['ca']['style']['steps']}; "
                                   f"ca object: {METHOD_TRAINING['ca']['object']['steps']}")
    assert _by_method("rank") == ""
    with pytest.raises(LookupError, match="NO_SUCH_NAME"):
        module_constant("bench/protocols.py", "NO_SUCH_NAME")
    assert (dataclass_defaults("regularizers/projection.py", "GradientProjection")["neighbors"]
            == du.GradientProjection(keep=["x"]).neighbors)
    assert _protocol_names() == list(PROTOCOLS)
    with pytest.raises(LookupError, match="NoSuchClass"):
        dataclass_defaults("bench/protocols.py", "NoSuchClass")


def test_world_registry_refuses_duplicates_and_bad_entries():
    assert world_names()[:3] == ["minicanvas", "tiny", "tiny-sdxl"]
    with pytest.raises(ValueError, match="already registered"):
        register_world(World("tiny", "again", pipeline="diffusers_unlearn.testing:tiny_pipeline"))
    with pytest.raises(ValueError, match="one lower-case word"):
        World("user/model", "a Hub id is not a world name", pipeline="diffusers_unlearn.testing:tiny_pipeline")
    with pytest.raises(ValueError, match="'package.module:function'"):
        World("mine", "no reference", pipeline="tiny_pipeline")
    with pytest.raises(TypeError, match="takes a World"):
        register_world("tiny")
    assert get_world("tiny") is WORLDS["tiny"] and get_world("./tiny") is None and get_world(None) is None
    folder = get_world("minicanvas").folder_path()
    assert (folder / "model_index.json").is_file()  # the shipped folder the error message points to


def test_a_new_world_is_one_registration_and_loads_everywhere(monkeypatch, tmp_path):
    monkeypatch.delitem(WORLDS, "tiny-two", raising=False)
    register_world(World("tiny-two", "the tiny pipeline, seed 2", pipeline="diffusers_unlearn.testing:tiny_pipeline",
                         pipeline_kwargs={"seed": 2}))
    try:
        pipe = du.load_pipeline("tiny-two")
        expected = du.testing.tiny_pipeline(seed=2)
        assert isinstance(pipe, du.UnlearnMixin)
        for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), expected.unet.state_dict().items()):
            assert torch.equal(a, b), name  # the same seeded construction, not a computation to compare
        plan = du.load_plan  # plan files take world names too: a folder named like the world does not shadow it
        (tmp_path / "tiny-two").mkdir()
        (tmp_path / "plan.yaml").write_text("model: tiny-two\noutput: out\nrequests: [{concept: cat}]\n")
        assert plan(tmp_path / "plan.yaml").model == "tiny-two"
    finally:
        WORLDS.pop("tiny-two", None)


def test_unknown_model_error_lists_the_worlds_and_the_shipped_folder(tmp_path, capsys):
    assert main(["unlearn", str(tmp_path / "nope"), "--concept", "cat", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for name in world_names():
        assert f"{name}: " in err
    assert str(get_world("minicanvas").folder_path()) in err


def parse(*argv: str):
    return build_parser().parse_args(["unlearn", *argv, "--out", "unused"])


def request_arguments(args, removed=()):
    """The request ``unlearn`` builds from the flags after ``removed`` (``build_request``), and its recipe's summary
    (None without a recipe)."""
    inputs, recipe = request_inputs(args)
    return build_request(args, inputs, removed=removed), (recipe.summary if recipe else None)


def test_registries_drive_method_and_regularizer_choices():
    from diffusers_unlearn.objectives import OBJECTIVES
    from diffusers_unlearn.regularizers import REGULARIZERS

    with pytest.raises(ValueError, match=f"registered methods: {', '.join(sorted(OBJECTIVES))}$"):
        request_arguments(parse("tiny", "--concept", "cat", "--method", "nope"))
    with pytest.raises(ValueError, match=f"registered: {', '.join(sorted(REGULARIZERS))}$"):
        request_arguments(parse("tiny", "--concept", "cat", "--regularizer", "l3_drift:weight=1"))
    with pytest.raises(TypeError, match="registered: du.L1Drift"):
        du.regularizers.check_regularizers(["l2"])


def test_regularizer_flag_takes_the_plan_form_and_combines_with_the_old_flags():
    kwargs, _ = request_arguments(parse(
        "tiny", "--concept", "cat", "--regularizer", "gradient_projection:keep=[monet, picasso],neighbors=2",
        "--regularizer", "l2_drift:weight=1e3", "--top-k", "0.2"))
    by_name = {r.name: r for r in kwargs.regularizers}
    assert sorted(by_name) == ["gradient_projection", "l2_drift", "selective_finetune"]
    assert by_name["gradient_projection"].keep == ["monet", "picasso"]
    assert by_name["gradient_projection"].neighbors == 2
    assert by_name["l2_drift"].weight == 1000.0 and by_name["selective_finetune"].top_k == 0.2
    # the same request written with the old flags gives the same regularizers
    old, _ = request_arguments(parse("tiny", "--concept", "cat", "--retain", "monet,picasso", "--neighbors", "2",
                                     "--l2", "1000", "--top-k", "0.2"))
    assert [r.to_dict() for r in old.regularizers] == [r.to_dict() for r in kwargs.regularizers]
    none, _ = request_arguments(parse("tiny", "--concept", "cat", "--regularizer", "none"))
    assert none.regularizers == []
    with pytest.raises(ValueError, match="cannot be combined"):
        request_arguments(parse("tiny", "--concept", "cat", "--regularizer", "none", "--l1", "1"))
    with pytest.raises(ValueError, match="once per request"):
        request_arguments(parse("tiny", "--concept", "cat", "--retain", "dog", "--regularizer", "gradient_projection"))
    with pytest.raises(ValueError, match="no setting"):
        request_arguments(parse("tiny", "--concept", "cat", "--regularizer", "l2_drift:wieght=1"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        request_arguments(parse("tiny", "--concept", "cat", "--regularizer", "l2_drift:1000"))
    plain, summary = request_arguments(parse("tiny", "--concept", "cat"))
    assert plain.regularizers == [] and summary is None  # tiny has no recipe: the library's defaults


def test_minicanvas_recipe_needs_a_domain_and_flags_override_it():
    with pytest.raises(ValueError, match="need a domain: style or object"):
        request_arguments(parse("minicanvas", "--concept", "neon lines"))
    with pytest.raises(ValueError, match="knows the domains style and object"):
        request_arguments(parse("minicanvas", "--concept", "neon lines", "--domain", "concept"))
    # the default is the recommended closed-form solve over the world's concepts, with --option values over it
    solved, summary = request_arguments(parse("minicanvas", "--concept", "neon lines", "--domain", "style",
                                              "--option", "negative_guidance=1"))
    assert "minicanvas recipe" in summary and "no training" in summary and solved.regularizers == []
    assert solved.method.method == "closed_form" and solved.method.negative_guidance == 1
    assert "neon dots" in solved.method.vocabulary["minicanvas-style"]
    # training flags ask for the trained recipe (ESD + gradient projection over the world's concepts)
    kwargs, summary = request_arguments(parse("minicanvas", "--concept", "neon lines", "--domain", "style",
                                              "--steps", "7", "--option", "negative_guidance=2", "--retain", "cat"))
    assert "minicanvas recipe" in summary and kwargs.training.steps == 7
    assert kwargs.method.negative_guidance == 2 and kwargs.domain == "minicanvas-style"
    (projection,) = kwargs.regularizers
    # --retain keeps the recipe's neighbour pool (the world's concepts), not the generic vocabulary
    assert projection.keep == ["cat"] and "neon dots" in projection.vocabulary["minicanvas-style"]
    ca, summary = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object", "--method", "ca"))
    assert ca.method.method == "ca" and ca.domain == "minicanvas-object"
    assert ca.method.anchor == "mushroom" and "a retain loss (weight 1.0) on the 8 minicanvas objects" in summary


def test_a_recipe_retain_loss_keeps_the_pool_less_the_concept_and_the_earlier_removals():
    args = parse("minicanvas", "--concept", "cat", "--domain", "object", "--method", "ca")
    served, _ = request_arguments(args, removed=["bear", "Tower"])
    recipe = request_inputs(args)[1]
    # the pool is the objects the bench does not score (the honest protocol: no recipe keeps a scored concept)
    from diffusers_unlearn.bench.world import MINICANVAS_EVAL_OBJECTS

    pool = [o for o in du.minicanvas.OBJECTS if o not in MINICANVAS_EVAL_OBJECTS]
    assert served.method.keep == tuple(o for o in pool if o not in ("cat", "bear", "tower"))
    assert served.method.keep_weight == recipe.preserve_weight > 0 and served.method.anchor == "mushroom"
    # a preserve option given on the command line wins; the closed form has no retain loss to add
    # the method's own retain list (under its former name: --option keep=... is the request's keep, which joins
    # the recipe's gradient projection instead) replaces the pool
    with pytest.warns(FutureWarning, match="`preserve` is deprecated"):
        own, _ = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object", "--method", "ca",
                                         "--option", "preserve=[dog]"))
    assert own.method.keep == ("dog",)
    joined, _ = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object", "--method", "ca",
                                        "--keep", "dog"))
    assert "dog" in joined.regularizers[0].keep and "dog" not in joined.method.keep
    args = parse("minicanvas", "--concept", "neon lines", "--domain", "style")
    recipe = request_inputs(args)[1]
    assert recipe.preserve is None and request_arguments(args)[0].method == recipe.unlearn_kwargs["method"]


def test_the_minicanvas_recipe_is_recommended_per_domain():
    from diffusers_unlearn.bench.world_recipe import RECOMMENDED_RECIPES

    styles, _ = request_arguments(parse("minicanvas", "--concept", "neon lines", "--domain", "style"))
    objects, summary = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object"))
    assert RECOMMENDED_RECIPES["style"][0] == "closed_form+verify" and styles.method.method == "closed_form"
    assert RECOMMENDED_RECIPES["object"] == ("gp", "ca")
    assert objects.method.method == "ca" and objects.method.anchor == "mushroom"
    assert [r.name for r in objects.regularizers] == ["gradient_projection"] and "retain loss" in summary
    # naming the closed form, or training flags (the trained method, esd), still pick those
    named, _ = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object", "--method",
                                       "closed_form"))
    trained, _ = request_arguments(parse("minicanvas", "--concept", "cat", "--domain", "object", "--steps", "5"))
    assert named.method.method == "closed_form" and trained.method.method == "esd"


def test_the_minicanvas_style_recipe_is_verified_by_the_classifier_unless_the_user_sets_the_guidance():
    from diffusers_unlearn.cli.unlearn import _recipe_escalation

    args = parse("minicanvas", "--concept", "neon lines", "--domain", "style")
    kwargs, recipe = request_inputs(args)
    assert "erasure_check" not in kwargs and isinstance(recipe.erasure_check, du.ClassifierCheck)
    assert recipe.erasure_check.seeds == [1] and not set(recipe.erasure_check.seeds) & set(du.minicanvas.EVAL_SEEDS)
    assert recipe.erasure_check.images_per_concept == 8
    assert _recipe_escalation(recipe, args) == [{"ridge": 1e-4}, {"ridge": 1e-4, "negative_guidance": 1.0},
                                                {"ridge": 1e-4, "negative_guidance": 2.0}]
    assert "verified by the style classifier on 8 check images, solved again with ridge=0.0001, then " \
           "ridge=0.0001, negative_guidance=1.0, then ridge=0.0001, negative_guidance=2.0" in recipe.summary
    own = parse("minicanvas", "--concept", "neon lines", "--domain", "style", "--option", "negative_guidance=1.5")
    assert _recipe_escalation(request_inputs(own)[1], own) is None  # the user's guidance stands
    trained = parse("minicanvas", "--concept", "neon lines", "--domain", "style", "--steps", "5")
    assert request_inputs(trained)[1].escalate is None  # the trained recipe has no ladder
    from diffusers_unlearn.bench import minicanvas_world
    from diffusers_unlearn.bench.world_recipe import world_recipe

    from diffusers_unlearn.engine.defaults import recommended_escalation

    plain = world_recipe(minicanvas_world(), "style", "closed_form", protocol="closed_form")
    # the unverified recipe escalates as pipe.unlearn's default does, on its default erasure check
    assert plain.erasure_check is None and plain.escalate == recommended_escalation("style", "closed_form")
    assert "(solved, no training)" in plain.summary and "verified" not in plain.summary
    assert "learning rate" not in plain.summary  # not the trained summary


def test_unlearn_minicanvas_on_the_command_line_serves_the_demo_request(tmp_path, capsys):
    from diffusers_unlearn.bench import PROTOCOLS, BenchSettings, Hyperparameters, minicanvas_world, serve_request
    from diffusers_unlearn.bench.world_recipe import RECOMMENDED_PROTOCOL

    world = minicanvas_world()
    stream = world.stream("style", 1)
    assert main(["unlearn", "minicanvas", "--concept", stream[0], "--domain", "style",
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "minicanvas recipe" in capsys.readouterr().out

    pipe = du.attach(world.load_pipeline())
    settings = BenchSettings(requests=1, protocols=[RECOMMENDED_PROTOCOL], hparams=Hyperparameters())
    serve_request(pipe, PROTOCOLS[RECOMMENDED_PROTOCOL], world, settings, stream, 0, progress=False)
    demo = pipe.unlearning_ledger.requests[0].to_dict()
    cli = json.loads((tmp_path / "cli" / "unlearning" / "ledger.json").read_text())["requests"][0]
    for key in ("concept", "domain", "method_config", "training", "seed", "strategy", "prompts"):
        assert cli[key] == demo[key], key
    strip = lambda regs: [{k: v for k, v in r.items() if k != "report"} for r in regs]  # noqa: E731
    assert strip(cli["regularizers"]) == strip(demo["regularizers"])
    protected = lambda regs: [p if isinstance(p, str) else p["concept"] for p in regs[0]["report"]["protected"]]  # noqa: E731,E501
    assert protected(cli["regularizers"]) == protected(demo["regularizers"])
    # Same weights and code path; the text states behind the solve come from text-encoder batches of another
    # composition (float32 sums in another order): measured 6e-8 of the largest entry at most.
    saved = du.load_pipeline(tmp_path / "cli")
    ours, theirs = saved.request_adapter("r0001").deltas(), pipe.request_adapter("r0001").deltas()
    assert ours.keys() == theirs.keys()
    for layer, delta in ours.items():
        error = float((delta - theirs[layer]).abs().max() / theirs[layer].abs().max())
        assert error < 1e-5, (layer, error)


def test_demo_grid_has_no_tick_marks_and_readable_labels():
    import matplotlib.pyplot as plt

    from diffusers_unlearn.cli.demo import grid_figure

    styles, objects = ["a", "b", "c"], ["x", "y"]
    panels = [(f"panel {k}", torch.rand(len(styles) * len(objects), 3, 8, 8)) for k in range(3)]
    fig = grid_figure(panels, styles, objects, removed=["b"])
    try:
        for index, ax in enumerate(fig.axes):
            for axis in (ax.xaxis, ax.yaxis):
                assert all(tick.tick1line.get_markersize() == 0 for tick in axis.get_major_ticks())
            assert [t.get_text() for t in ax.get_xticklabels()] == objects
            rows = [t.get_text() for t in ax.get_yticklabels()]
            assert rows == (["a", "b (removed)", "c"] if index == 0 else [])  # row names once, on the left
            assert min(t.get_fontsize() for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]) >= 10
    finally:
        plt.close(fig)


# the CLI prints the library's warnings through the active filters; the suite's ini filter hides them elsewhere
@pytest.mark.filterwarnings("default::diffusers_unlearn._warn.UnlearnWarning")
def test_unlearn_shows_labelled_progress_one_warning_and_quiet_silences_the_bars(tmp_path, capsys):
    args = ["unlearn", "tiny", "--concept", "van gogh", "--domain", "style", "--steps", "1",
            "--option", "sampling_steps=3", "--option", "num_trajectories=1", "--top-k", "0.3",
            # a threshold every request exceeds: the in-span warning must appear, once
            "--regularizer", "gradient_projection:warn_in_span=0.0001,keep=[monet],neighbors=2,vocabulary=[dali, cat, "
            "goya]"]
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    captured = capsys.readouterr()
    for label in ("sampling 1 trajectory of the frozen model", "gradient projection: embedding neighbour candidates",
                  "selective fine-tuning: importance scores", "unlearning 'van gogh'", "saving the unlearned pipeline"):
        assert label in captured.err, label
    assert "regularizers: selective_finetune(top_k=0.3), gradient_projection(keep=['monet'], neighbors=2" \
        in captured.out  # --retain's neighbours are said, not silent
    # the in-span warning once; a one-step request also gets the erasure check's own warning (issue 10)
    warned = [line for line in captured.err.splitlines() if ": warning: " in line and "lies in the span" in line]
    assert len(warned) == 1, warned
    assert warned[0].startswith("diffusers-unlearn unlearn: warning: ")
    assert "of the embedding of 'van gogh' lies in the span" in warned[0]
    assert "on the command line: --neighbors (now 2), --retain (now ['monet']), --steps" in warned[0]
    assert ".py:" not in captured.err and "setup(ctx)" not in captured.err and "''s" not in captured.err

    assert main([*args, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "%|" not in captured.err and "it/s" not in captured.err  # no bar at all, the libraries' included
    assert "saving the unlearned pipeline" not in captured.err


def test_an_unlearned_minicanvas_folder_keeps_its_world_recipe(tmp_path):
    from diffusers_unlearn.cli.unlearn import _world_of_folder

    ledger = tmp_path / "out" / "unlearning" / "ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"requests": [{"domain": "minicanvas-style"}, {"domain": "minicanvas-object"}]}))
    assert _world_of_folder(str(tmp_path / "out")) is get_world("minicanvas")
    ledger.write_text(json.dumps({"requests": [{"domain": "style"}]}))
    assert _world_of_folder(str(tmp_path / "out")) is None  # generic prompts: no world
    ledger.write_text(json.dumps({"requests": [{"domain": "tiny-style"}]}))
    assert _world_of_folder(str(tmp_path / "out")) is None  # a world without a recipe
    ledger.write_text("not json")
    assert _world_of_folder(str(tmp_path / "out")) is None
    assert _world_of_folder(str(tmp_path / "missing")) is None
