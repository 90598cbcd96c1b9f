"""A world knows its concepts (issue 33): a MiniCanvas request for a concept outside its vocabulary (a misspelled
style) is refused before any work, with the nearest names, in Python and on the command line; the recommended
default changes the tiny pipelines too, and a request that moves nothing is recorded as not erased."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import generate, kv_state

import diffusers_unlearn as du
from diffusers_unlearn.cli import main
from diffusers_unlearn.worlds import UnknownConceptError, get_world, world_of


@pytest.fixture(scope="module")
def minicanvas():
    pipe = du.minicanvas.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return du.attach(pipe)


def test_a_misspelled_minicanvas_style_is_refused_with_the_nearest_names(minicanvas):
    before = kv_state(minicanvas)
    for domain in ("style", "minicanvas-style", None):
        with pytest.raises(UnknownConceptError, match=r"'neon line' is not a minicanvas style.*did you mean "
                                                      r"'neon lines'.*The minicanvas styles.* are: neon lines, "):
            minicanvas.unlearn("neon line", domain=domain)
    with pytest.raises(UnknownConceptError, match="'cat' is not a minicanvas style: it is a minicanvas object"):
        minicanvas.unlearn("cat", domain="minicanvas-style")
    assert minicanvas.unlearning_ledger.ids() == []
    after = kv_state(minicanvas)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_how_a_pipeline_knows_its_world(minicanvas):
    world = get_world("minicanvas")
    assert world_of(minicanvas) == (world, None) and world_of(minicanvas, "object") == (world, "object")
    tiny = du.testing.tiny_pipeline(seed=0)
    assert world_of(tiny, "style") == (None, None)
    assert world_of(tiny, "minicanvas-object") == (world, "object")  # a world's prompt domain names it
    world.check_concept("Neon  Lines", "style")  # case and spacing do not matter
    world.check_concept("cat")
    assert get_world("tiny").vocabulary() is None  # a world that does not list its concepts accepts any


def test_a_request_with_its_own_prompts_describes_itself(minicanvas):
    # the bench's simultaneous retraining removes "a+b" through explicit prompts: not a vocabulary word
    from diffusers_unlearn.worlds import check_world_concept

    check_world_concept(minicanvas, "neon lines+pastel waves", "minicanvas-style", prompts_given=True)
    with pytest.raises(UnknownConceptError):
        check_world_concept(minicanvas, "neon lines+pastel waves", "minicanvas-style")


def test_unlearn_minicanvas_refuses_a_misspelled_style_before_loading(tmp_path, capsys, monkeypatch):
    import diffusers_unlearn.worlds as worlds

    monkeypatch.setattr(worlds.World, "load_pipeline", lambda self: pytest.fail("loaded the model"))
    assert main(["unlearn", "minicanvas", "--concept", "neon line", "--domain", "style",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'neon line' is not a minicanvas style: did you mean 'neon lines'" in err
    assert not (tmp_path / "out").exists()


def test_the_recommended_default_changes_the_tiny_pipeline_and_warns_nothing():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "changes nothing" nor "did not erase"
        record = pipe.unlearn("van gogh", domain="style")
    assert record.method == "closed_form" and record.erasure["erased"] is True
    report = record.regularizers[0]["report"]
    # the built-in vocabulary spans all 32 input directions; the recipe holds 24 exactly and leaves 8 to edit
    assert report["protected_rank_uncapped"] == 32 and report["protected_rank"] == 24 and report["solve_rank"] > 0
    assert (generate(pipe) - before).abs().max() > 1e-2


def test_the_cap_is_validated():
    for bad in (0, 1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="max_kept_fraction must be"):
            du.UnlearnRequest.build("van gogh", "closed_form", max_kept_fraction=bad)
