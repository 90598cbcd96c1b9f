"""Sibling states: the closed form's soft protection of a concept's words beside random ones (``siblings=``)."""

from __future__ import annotations

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn.kv.text_states import PromptStates
from diffusers_unlearn.objectives.closed_form import ClosedFormConfig
from diffusers_unlearn.objectives.closed_form.siblings import _CACHE, sibling_tokens

BUILDERS = {"sd": du.testing.tiny_pipeline, "sdxl": du.testing.tiny_sdxl_pipeline,
            "sd3": du.testing.tiny_sd3_pipeline, "flux": du.testing.tiny_flux_pipeline}
PROMPTS = ["a painting in van gogh style", "a photo of a cat in van gogh style"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_each_word_is_replaced_by_seeded_random_embeddings(family):
    pipe = BUILDERS[family](seed=0)
    states = PromptStates.for_pipeline(pipe, steps=2)
    rows = sibling_tokens(pipe, "van gogh", PROMPTS, 3, states)
    # an exact count: 2 prompts x 2 words x 3 draws, each from its word's first token to the end of every segment
    # (and at each timestep where the states depend on it)
    hidden, segments = states.states(PROMPTS)
    per_prompt = []
    for row in range(len(PROMPTS)):
        count = 0
        for segment in segments:
            end = segment.offset + len(segment.ids[0])
            ids = segment.tokenizer("van gogh", add_special_tokens=False).input_ids
            start = next(i for i in range(len(segment.ids[row])) if segment.ids[row][i:i + len(ids)] == ids)
            van = len(segment.tokenizer("van", add_special_tokens=False).input_ids)
            count += (end - segment.offset - start) + (end - segment.offset - start - van)
        per_prompt.append(count)
    assert rows.shape == (3 * sum(per_prompt) * hidden.shape[0], hidden.shape[-1])
    assert torch.isfinite(rows).all()
    # seeded: the same draws again once the cache is cleared
    pipe.__dict__.pop(_CACHE)
    assert torch.equal(sibling_tokens(pipe, "van gogh", PROMPTS, 3, states), rows)
    # a measured effect: the replaced word's states are not the real word's (the replacement took hold)
    first_segment = segments[0]
    ids = first_segment.tokenizer("van gogh", add_special_tokens=False).input_ids
    start = next(i for i in range(len(first_segment.ids[0])) if first_segment.ids[0][i:i + len(ids)] == ids)
    real = hidden[0, 0, first_segment.offset + start]
    assert (rows[0] - real).norm() > 1e-3 * real.norm()


def test_minicanvas_a_sibling_of_a_removed_style_moves_less_with_siblings():
    """On MiniCanvas, removing "neon lines": the K/V outputs of "neon dots" (a style nobody named, sharing its first
    word) move less when the solve keeps the removed style's words beside random ones, while the removed style's
    own tokens still reach their anchor."""
    from diffusers_unlearn import minicanvas as mc
    from diffusers_unlearn.objectives.closed_form.keys import concept_tokens, mapping_keys

    moved, gap = {}, {}
    for siblings in (0, 16):
        pipe = du.attach(mc.load_pipeline())
        pipe.set_progress_bar_config(disable=True)
        record = pipe.unlearn("neon lines", domain="style", siblings=siblings, require_erasure=False, progress=False)
        assert ("siblings" in record.method_config) == bool(siblings)
        state = pipe._unlearning()
        base = state.base_weights
        last = pipe.unlearning_ledger.ids()[-1]
        delta = {n: state.artifacts[last].delta(n).double() for n in base}
        kept = concept_tokens(pipe, "neon dots", "style")
        moved[siblings] = sum(float((kept @ delta[n].T).square().sum()) for n in base) ** 0.5 / \
            sum(float((kept @ w.double().T).square().sum()) for n, w in base.items()) ** 0.5
        keys, targets = mapping_keys(pipe, "neon lines", "", record.prompts)
        gap[siblings] = sum(float((keys @ (w.double() + delta[n]).T - targets @ w.double().T).square().sum())
                            for n, w in base.items()) ** 0.5 / \
            sum(float(((keys - targets) @ w.double().T).square().sum()) for n, w in base.items()) ** 0.5
    # measured: 0.64 -> 0.33 of the kept style's K/V output norm
    assert moved[16] < 0.7 * moved[0], moved
    # the removed style still reaches its anchor (measured gap 0.06 -> 0.08 of the base's distance to it)
    assert gap[16] < 0.3, gap


@pytest.mark.parametrize("options, error, match", [
    (dict(siblings=-1), ValueError, r"siblings must be an integer >= 0"),
    (dict(siblings=10**6), ValueError, r"siblings must be an integer >= 0 \(at most 256\)"),
    (dict(siblings=2.5), ValueError, r"siblings must be an integer >= 0"),
    (dict(siblings=4, sibling_weight=float("nan")), ValueError, "sibling_weight must be a number >= 0"),
    (dict(siblings=4, sibling_weight=-1.0), ValueError, "sibling_weight must be a number >= 0"),
])
def test_bad_sibling_settings_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        ClosedFormConfig(**options)


def test_a_record_without_siblings_is_the_record_it_always_was():
    assert "siblings" not in ClosedFormConfig().to_dict() and "sibling_weight" not in ClosedFormConfig().to_dict()
    assert ClosedFormConfig(siblings=8, sibling_weight=0.5).to_dict()["siblings"] == 8
