"""The deployment subcommands: unlearn, run, fold, audit, push; --help everywhere; exit codes and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST
from PIL import Image

import diffusers_unlearn as du
from diffusers_unlearn.engine.audit import PANELS, audit_images
from diffusers_unlearn.cli import build_parser, main

FAST_ARGS = ["--steps", "3", "--learning-rate", "1e-2", "--option", "sampling_steps=4", "--option",
             "num_trajectories=2", "--quiet"]
MINE = ("unlearn", "run", "fold", "audit", "push")


def registered_commands():
    parser = build_parser()
    return sorted(next(a for a in parser._actions if a.dest == "command").choices)


@pytest.mark.parametrize("command", sorted(set(MINE) | set(registered_commands())))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: diffusers-unlearn {command}" in capsys.readouterr().out


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.startswith(f"diffusers-unlearn {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """Two requests made on the command line: one from the tiny model, one onto the saved folder in place."""
    out = tmp_path_factory.mktemp("cli") / "out"
    assert main(["unlearn", "tiny", "--concept", "van gogh", "--domain", "style", "--retain", "monet,picasso",
                 "--l2", "1000", "--out", str(out), *FAST_ARGS]) == 0
    assert main(["unlearn", str(out), "--concept", "dog", "--domain", "object", "--top-k", "0.1", "--seed", "1",
                 "--out", str(out), *FAST_ARGS]) == 0
    return out


def test_unlearn_writes_a_folder_and_updates_it_in_place(cli_folder):
    ledger = json.loads((cli_folder / "unlearning" / "ledger.json").read_text())
    assert [r["concept"] for r in ledger["requests"]] == ["van gogh", "dog"]
    first, second = ledger["requests"]
    assert first["steps"] == 3 and first["training"]["learning_rate"] == 1e-2
    assert first["method_config"]["sampling_steps"] == 4
    assert [r["name"] for r in first["regularizers"]] == ["gradient_projection", "l2_drift"]
    assert first["regularizers"][0]["keep"] == ["monet", "picasso"]
    assert second["regularizers"][0] == {**second["regularizers"][0], "name": "selective_finetune", "top_k": 0.1}
    assert second["seed"] == 1 and second["adapter"]["kind"] == "dense"
    loaded = du.load_pipeline(cli_folder)
    assert loaded.removed_concepts == ["van gogh", "dog"] and loaded.unlearning_mode == "folded"


def test_fold_rolls_back_and_says_so(cli_folder, tmp_path, capsys):
    capsys.readouterr()
    assert main(["fold", str(cli_folder), "--rollback", "r0001", "--out", str(tmp_path / "folded"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "rolled back r0001 ('van gogh'): re-folded the base weights with the 1 remaining request(s)" in out
    folded = du.load_pipeline(tmp_path / "folded")
    assert folded.unlearning_ledger.ids() == ["r0002"]
    assert folded.unlearning_ledger.history[-1]["event"] == "rollback"
    original = du.load_pipeline(cli_folder)
    assert original.removed_concepts == ["van gogh", "dog"]  # the source folder is untouched

    assert main(["fold", str(cli_folder), "--rollback", "r0001", "--rollback", "r0099", "--out",
                 str(tmp_path / "never")]) == 2
    assert "no request 'r0099'" in one_line_error(capsys, "fold")
    assert not (tmp_path / "never").exists()


def test_fold_a_ledger_folder_onto_its_base_model(tmp_path, capsys):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **dict(FAST, steps=2))
    pipe.save_unlearning(tmp_path / "ledger")  # what `demo --out` writes
    assert main(["fold", str(tmp_path / "ledger"), "--out", str(tmp_path / "x")]) == 2
    assert "pass --model" in one_line_error(capsys, "fold")
    assert main(["fold", str(tmp_path / "ledger"), "--model", "tiny"]) == 2
    assert "pass --out" in one_line_error(capsys, "fold")
    assert main(["fold", str(tmp_path / "ledger"), "--model", "tiny", "--out", str(tmp_path / "x"), "--quiet"]) == 0
    assert du.load_pipeline(tmp_path / "x").removed_concepts == ["van gogh"]
    assert main(["fold", str(tmp_path / "ledger"), "--model", "tiny-sdxl", "--out", str(tmp_path / "y")]) == 2
    assert "fingerprint" in one_line_error(capsys, "fold")


def test_audit_writes_a_labelled_grid_of_the_four_panels(cli_folder, tmp_path, capsys):
    grid_path = tmp_path / "grid.png"
    assert main(["audit", str(cli_folder), "--request", "r0002", "--prompt", "a photo of a dog", "--steps", "3",
                 "--out", str(grid_path), "--quiet"]) == 0
    assert "only r0002" in capsys.readouterr().out
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    tile, label, gap = 256, 22, 4
    assert grid.shape == (2 * (tile + label + gap) - gap, 2 * (tile + gap) - gap, 3)
    pipe = du.load_pipeline(cli_folder)
    pipe.set_progress_bar_config(disable=True)
    images = audit_images(pipe, "r0002", "a photo of a dog", num_inference_steps=3, seed=0)
    tiles = {}
    for index, name in enumerate(PANELS):
        x, y = (index % 2) * (tile + gap), (index // 2) * (tile + label + gap) + label
        tiles[name] = grid[y : y + tile, x : x + tile]
        expected = np.asarray(images[name].convert("RGB").resize((tile, tile), Image.NEAREST))
        # exact: the command ran audit_images in this process on the same folder; the grid only copies its pixels
        assert np.array_equal(tiles[name], expected), name
    assert not np.array_equal(tiles["base"], tiles["all"])
    assert not np.array_equal(tiles["only"], tiles["without"])
    plain = du.testing.tiny_pipeline(seed=0)  # "base" is the untouched model
    import torch

    base = plain("a photo of a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    # exact: the folder's base K/V weights are the tiny model's, bit for bit, and a LoRA layer with no active
    # adapter calls its base layer alone, so this is the same computation in this process
    assert np.array_equal(np.asarray(base), np.asarray(images["base"]))


def test_run_plan_and_rerun(tmp_path, capsys):
    (tmp_path / "plan.yaml").write_text(
        "model: tiny\noutput: out\ndefaults: {steps: 2, sampling_steps: 4, num_trajectories: 2}\n"
        "requests:\n  - {concept: van gogh, domain: style}\n  - {concept: dog, domain: object, seed: 1}\n"
    )
    assert main(["run", str(tmp_path / "plan.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] 'van gogh': removed as r0001" in out and "[2/2] 'dog': removed as r0002" in out
    assert main(["run", str(tmp_path / "plan.yaml"), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert du.load_pipeline(tmp_path / "out").removed_concepts == ["van gogh", "dog"]
    (tmp_path / "bad.yaml").write_text("model: tiny\noutput: out\nrequests: [{concept: cat, bogus: 1}]\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "request 1 ('cat')" in one_line_error(capsys, "run")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in one_line_error(capsys, "run")


@pytest.mark.parametrize(
    "args, command, match",
    [
        (["unlearn", "tiny", "--concept", "cat", "--rank", "half", "--out", "{tmp}/o"], "unlearn", "--rank must be"),
        (["unlearn", "tiny", "--concept", "cat", "--option", "oops", "--out", "{tmp}/o"], "unlearn", "KEY=VALUE"),
        (["unlearn", "tiny", "--concept", "cat", "--option", "bogus=1", "--out", "{tmp}/o"], "unlearn", "bogus"),
        (["unlearn", "tiny", "--concept", "cat", "--top-k", "2", "--out", "{tmp}/o"], "unlearn", "top_k"),
        (["unlearn", "{tmp}/nothing", "--concept", "cat", "--out", "{tmp}/o"], "unlearn", "is not a world name"),
        (["unlearn", "tiny", "--concept", "cat", "--out", "{tmp}/foreign"], "unlearn", "not an unlearned pipeline"),
        (["unlearn", "tiny", "--concept", " ", "--out", "{tmp}/o"], "unlearn", "non-empty"),
        (["unlearn", "tiny", "--concept", "c", "--base-model", "<b>", "--out", "{tmp}/o"], "unlearn", "Hub model id"),
        (["audit", "{tmp}/nothing", "--request", "r0001", "--prompt", "x"], "audit", "does not exist"),
        (["audit", "{tmp}/foreign", "--request", "r0001", "--prompt", "x", "--out", "g.jpg"], "audit", ".png"),
        (["push", "{tmp}/foreign", "--repo-id", "u/m", "--dry-run"], "push", "not an unlearned pipeline folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, command, match):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    assert match in one_line_error(capsys, command)
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_unknown_request_in_audit_and_missing_arguments(cli_folder, capsys):
    assert main(["audit", str(cli_folder), "--request", "r0099", "--prompt", "x"]) == 2
    assert "known request ids: ['r0001', 'r0002']" in one_line_error(capsys, "audit")
    with pytest.raises(SystemExit) as info:
        main(["unlearn", "tiny", "--out", "x"])  # no --concept
    assert info.value.code == 2


def test_refused_architecture_and_debug_traceback(tmp_path, capsys):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    DiTPipeline(
        transformer=DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        vae=du.testing._tiny_vae(), scheduler=DDIMScheduler(),
    ).save_pretrained(tmp_path / "dit")
    args = ["unlearn", str(tmp_path / "dit"), "--concept", "cat", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    assert "supported: Stable Diffusion 1.x/2.x and SDXL" in one_line_error(capsys, "unlearn")
    assert main(["--debug", *args]) == 2
    assert "Traceback" in capsys.readouterr().err

