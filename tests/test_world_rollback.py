"""Rolling back any request of a world's stream (issue 33): the closed-form requests after it are re-solved in a
process that never registered the world's prompt domains (a loaded folder, the command line), and the result is
the stream that never had the rolled-back request."""

from __future__ import annotations

import json

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn.cli import main
from diffusers_unlearn.prompts import TEMPLATES, check_domain

WORLD_DOMAINS = ("minicanvas-style", "minicanvas-object")
# A small kept set and few solve timesteps: the solve is the same code as the recipe's, at a fraction of its cost.
VOCABULARY = {"minicanvas-style": ["neon dots", "ink wash", "ocean rings"], "minicanvas-object": ["cat", "bear"]}
REQUEST = dict(method="closed_form", domain="minicanvas-style", vocabulary=VOCABULARY, sampling_steps=2,
               num_trajectories=2, progress=False)
STREAM = ["neon lines", "pastel waves", "forest hatching"]


def forget_world_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a fresh one sees it: no world's prompt domain registered yet."""
    for domain in WORLD_DOMAINS:
        if dict.__contains__(TEMPLATES, domain):
            monkeypatch.delitem(TEMPLATES, domain)


def stream_pipeline(concepts: list[str]):
    pipe = du.load_pipeline("minicanvas")
    pipe.set_progress_bar_config(disable=True)
    for concept in concepts:
        pipe.unlearn(concept, **REQUEST)
    return pipe


@pytest.fixture(scope="module")
def never_had_the_first():
    return stream_pipeline(STREAM[1:])


def assert_same_solves(pipe, reference) -> None:
    """The re-solved requests are the reference stream's solves: the same float64 solve on the same inputs, its
    factors rounded to float32 and multiplied out, so agreement to 1e-5 of each delta's largest entry (float32 is
    good to 6e-8 relative; the text states behind the solve may come from batches of another composition)."""
    assert pipe.removed_concepts == reference.removed_concepts
    for ours_id, ref_id in zip(pipe.unlearning_ledger.ids(), reference.unlearning_ledger.ids()):
        ours, ref = pipe.request_adapter(ours_id).deltas(), reference.request_adapter(ref_id).deltas()
        assert ours.keys() == ref.keys()
        for layer, delta in ref.items():
            assert float(delta.abs().max()) > 0  # a real edit, not two zeros agreeing
            torch.testing.assert_close(ours[layer], delta, rtol=0, atol=1e-5 * float(delta.abs().max()))


def test_a_world_domain_comes_back_in_a_process_that_never_registered_it(monkeypatch):
    forget_world_domains(monkeypatch)
    assert check_domain("minicanvas-style") == "minicanvas-style"
    from diffusers_unlearn.bench.world import (
        MINICANVAS_PROMPT_OBJECTS,
        MINICANVAS_PROMPT_STYLES,
        minicanvas_world,
        world_templates,
    )

    mc = du.minicanvas
    assert list(TEMPLATES["minicanvas-object"]) == world_templates(mc.PROMPT_TEMPLATE, MINICANVAS_PROMPT_STYLES,
                                                                   MINICANVAS_PROMPT_OBJECTS, "object")
    assert len(TEMPLATES["minicanvas-style"]) == len(MINICANVAS_PROMPT_OBJECTS)
    # the same prompts as the bench's world writes (a rollback re-solves what the bench solved)
    world = minicanvas_world(eval_seeds=1)
    assert [list(TEMPLATES[world.prompt_domain(d)]) for d in ("style", "object")] == \
        [world.templates(d) for d in ("style", "object")]
    with pytest.raises(ValueError, match="unknown domain 'minicanvas-colour'"):
        check_domain("minicanvas-colour")
    with pytest.raises(KeyError):
        TEMPLATES["nowhere-style"]


def test_rolling_back_the_first_of_three_minicanvas_requests_matches_a_stream_without_it(
        never_had_the_first, monkeypatch):
    pipe = stream_pipeline(STREAM)
    before = {i: pipe.request_adapter(i).deltas() for i in pipe.unlearning_ledger.ids()[1:]}
    forget_world_domains(monkeypatch)
    pipe.rollback("r0001")
    assert pipe.unlearning_ledger.history[-1]["resolved"] == ["r0002", "r0003"]
    assert_same_solves(pipe, never_had_the_first)
    # the re-solve did something: the stored solves kept "neon lines" mapped, the new ones do not
    changed = [float((pipe.request_adapter(i).deltas()[k] - d[k]).abs().max() / d[k].abs().max())
               for i, d in before.items() for k in d]
    assert max(changed) > 1e-3


def test_fold_rollback_of_the_first_request_on_the_command_line(never_had_the_first, tmp_path, monkeypatch, capsys):
    pipe = stream_pipeline(STREAM)
    pipe.save_unlearned(tmp_path / "cli1")
    forget_world_domains(monkeypatch)
    assert main(["fold", str(tmp_path / "cli1"), "--rollback", "r0001", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.count("rolled back r0001") == 1 and "rolled back" not in out.err
    assert "re-solving the closed-form one(s) after it (r0002, r0003)" in out.out
    ledger = json.loads((tmp_path / "x" / "unlearning" / "ledger.json").read_text())
    assert [r["concept"] for r in ledger["requests"]] == STREAM[1:]
    assert_same_solves(du.load_pipeline(tmp_path / "x"), never_had_the_first)
