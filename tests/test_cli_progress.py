"""No silent minute on the command line (issue 33): every long phase of ``unlearn`` is labelled on stderr, the
reported time is the time waited, the check's result is printed, the recipe is a short summary, audit's bars say
which panel they draw; --quiet silences the labels."""

from __future__ import annotations

import re

from diffusers_unlearn.cli import main

REQUEST = ["unlearn", "tiny", "--concept", "van gogh", "--domain", "style", "--method", "closed_form",
           "--option", "sampling_steps=3", "--option", "vocabulary=[monet, picasso]"]


def test_unlearn_labels_every_phase_and_reports_the_time_waited_and_the_check(tmp_path, capsys, monkeypatch):
    import diffusers_unlearn._progress as progress

    monkeypatch.setattr(progress, "ANNOUNCE_AFTER", 0)  # the tiny model's phases are shorter than the delay
    assert main([*REQUEST, "--out", str(tmp_path / "loud")]) == 0
    captured = capsys.readouterr()
    for label in ("loading tiny...", "loading tiny: done in", "encoding 2 kept concepts", "solving 'van gogh'",
                  "checking that 'van gogh' is erased: done in", "saving the unlearned pipeline"):
        assert label in captured.err, label
    waited, solving = map(float, re.search(r"removed 'van gogh' as r0001 in ([\d.]+) s \(solving ([\d.]+) s, "
                                           r"the erasure check ([\d.]+) s", captured.out).groups()[:2])
    assert waited >= solving  # the time waited covers the solve and the check
    assert re.search(r"^check: (erased|NOT erased), its prediction shifted by [\d.]+ of the concept's own signal",
                     captured.out, re.M)

    assert main([*REQUEST, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "loading tiny" not in captured.err and "checking that" not in captured.err and "%|" not in captured.err
    assert "check: " in captured.out  # the result is output, not progress

    assert main(["audit", str(tmp_path / "loud"), "--request", "r0001", "--prompt", "a painting in van gogh style",
                 "--steps", "2", "--out", str(tmp_path / "audit.png")]) == 0
    err = capsys.readouterr().err
    for panel in ("audit panel base: base (no request)", "audit panel all: all 1 request(s)",
                  "audit panel only: only r0001 (van gogh)", "audit panel without: all but r0001"):
        assert panel in err, panel


def test_the_minicanvas_recipe_is_printed_as_a_short_summary():
    from diffusers_unlearn.bench.world_recipe import describe_config
    from diffusers_unlearn.worlds import get_world

    recipe = get_world("minicanvas").request_recipe("style", None)
    assert len(recipe.summary) < 600 and "ClosedFormConfig(" not in recipe.summary
    assert "closed_form(" in recipe.summary and "vocabulary=<80 concepts>" in recipe.summary
    assert describe_config(recipe.unlearn_kwargs["method"]).startswith("closed_form(sampling_steps=20")
    trained = get_world("minicanvas").request_recipe("style", "esd")
    assert "all 80 minicanvas concepts kept" in trained.summary and "the all" not in trained.summary
