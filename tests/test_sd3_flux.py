"""SD3 and Flux (joint transformers, flow matching) on the tiny offline pipelines: erasure, gradient projection's
per-block invariant, the closed-form method on the first joint block, save/load, plain-diffusers loads of the folder
and the LoRAs, rollback, bad input, and how much of what sets a prompt apart reaches the model through the pooled
text rather than the tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from conftest import PROMPT, generate
from deploy_helpers import check_with_plain_diffusers
from dit_world import UNRELATED_PROMPTS, base_trajectory, teach_concept_pictures, velocity_moves
from test_cli_worlds import parse as parse_unlearn_flags

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.analysis import conditioning_routes, text_stream_change
from diffusers_unlearn.families.registry import conditioner_for
from diffusers_unlearn.objectives.closed_form import ClosedFormConfig, mapping_keys
from diffusers_unlearn.prompts import TEMPLATES
from diffusers_unlearn.kv.text_states import PromptStates
from diffusers_unlearn.vocabulary import DEFAULT_VOCABULARY

FAST = dict(steps=6, sampling_steps=4, num_trajectories=2, learning_rate=1e-2)
FAMILIES = {
    "sd3": (du.testing.tiny_sd3_pipeline, "StableDiffusion3Pipeline", "UnlearnStableDiffusion3Pipeline"),
    "flux": (du.testing.tiny_flux_pipeline, "FluxPipeline", "UnlearnFluxPipeline"),
}
# FluxPipeline loaded from a folder defaults to 128 latent pixels whatever the model: ask for the tiny size.
SIZE = dict(height=16, width=16)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def stream(request, tmp_path_factory):
    """Two requests (ESD with gradient projection keeping "monet", then CA on an object), saved with save_unlearned.
    Tests must not change the pipeline."""
    build, _, _ = FAMILIES[request.param]
    pipe = du.attach(build(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0,
                 regularizers=[du.GradientProjection(keep=["monet"], neighbors=0)], **FAST)
    pipe.unlearn("dog", method="ca", anchor="cat", domain="object", seed=1, **FAST)
    folder = tmp_path_factory.mktemp(request.param) / "saved"
    pipe.save_unlearned(folder)
    return request.param, pipe, folder


def test_the_text_stream_projections_of_the_joint_blocks_are_adapted(stream):
    family, pipe, _ = stream
    layers = ad.kv_module_names(pipe.transformer)
    # every joint (dual-stream) block's add_k_proj / add_v_proj, nothing of Flux's single-stream blocks
    assert layers == [f"transformer_blocks.{i}.attn.add_{kv}_proj" for i in (0, 1) for kv in ("k", "v")]
    assert pipe.request_adapter("r0001").layers == layers
    assert pipe.unlearning_ledger.requests[0].adapter["targets"] == ["attn.add_k_proj", "attn.add_v_proj"]
    assert du.concept_embedding(pipe, "monet").shape == (pipe.transformer.context_embedder.out_features,)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_esd_moves_the_target_velocity_more_than_unrelated_prompts(family):
    # on a tiny transformer taught to draw what its concept tokens say (dit_world): a random one draws every prompt
    # alike, so no edit of its text stream could be selective
    pipe = du.attach(teach_concept_pictures(FAMILIES[family][0](seed=0)))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    moved = velocity_moves(pipe, ["a painting in van gogh style", *UNRELATED_PROMPTS])
    # the median: in a world of random pictures one unrelated concept can lie close to the target's
    target, unrelated = moved[0].item(), moved[1:].median().item()
    print(family, "relative velocity change: target", f"{target:.3f}", "unrelated median", f"{unrelated:.3f}",
          "max", f"{moved[1:].max().item():.3f}")
    assert target > 2 * unrelated, (target, unrelated)


# ------------------------------------------------------------------------------------------- closed form
FIRST_BLOCK = ("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj")
# The tiny text stream is 64 wide and each kept concept takes one column per tokenizer segment (SD3: CLIP and T5)
# and solve timestep: a small vocabulary leaves free directions for the edit. "cat" is left out: it is the
# unrelated prompt below.
CF_VOCABULARY = {"style": ["monet", "picasso", "cubism", "watercolor"], "object": ["horse", "tree"]}
CLOSED_FORM = dict(method="closed_form", vocabulary=CF_VOCABULARY, sampling_steps=2)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def solved(request):
    """Two closed-form requests ("van gogh", then "dog" keeping it mapped). Tests must not change the pipeline."""
    pipe = du.attach(FAMILIES[request.param][0](seed=0))
    pipe.unlearn("van gogh", domain="style", **CLOSED_FORM)
    pipe.unlearn("dog", domain="object", **CLOSED_FORM)
    return request.param, pipe


def _first_block_delta(pipe, request_id, layer):
    state = pipe._unlearning()
    return state.base_weights[layer].double(), state.artifacts[request_id].delta(layer).double()


def test_closed_form_edits_the_first_joint_block_on_states_no_image_enters(solved):
    family, pipe = solved
    record = pipe.unlearning_ledger.requests[0]
    adapter = pipe.request_adapter(record.request_id)
    assert record.method == "closed_form" and record.steps == 0
    assert adapter.layers == ad.kv_module_names(pipe.transformer)  # every K/V layer stored, as for other methods
    report = record.regularizers[0]["report"]
    assert report["solved_layers"] == 2 and report["solve_rank"] > 0 and 0 < report["target_in_span"] < 1
    for layer in adapter.layers:
        moved = adapter.delta(layer).abs().max()
        assert (moved > 0) if layer in FIRST_BLOCK else (moved == 0), layer
    # what the solve reads (a one-token image, cut after the first block) is what the block reads while generating
    conditioner = conditioner_for(pipe, guidance_scale=3.0)
    prompts = ["a painting in van gogh style", "a photo of a cat"]
    latents, timesteps = base_trajectory(pipe, conditioner, prompts)
    read = conditioner.prompt_kv_inputs(conditioner.encode(prompts), FIRST_BLOCK[0], timesteps)
    for step in range(len(timesteps)):
        seen = conditioner.kv_inputs(pipe.transformer, latents[step], timesteps[step].reshape(1),
                                     conditioner.encode(prompts), list(FIRST_BLOCK))
        for layer in FIRST_BLOCK:
            torch.testing.assert_close(seen[layer], read[step], rtol=0, atol=1e-6)


def _kept_states(conditioner, timesteps):
    """[n, d] float64: what the solve keeps exactly, rebuilt here from the conditioner: per solve timestep, "monet"'s
    embedding in each tokenizer segment (mean over the style templates of the mean over its tokens) and the
    unconditional prompt's start and end tokens."""
    prompts = [t.format("monet") for t in TEMPLATES["style"]]
    states = conditioner.prompt_kv_inputs(conditioner.encode(prompts), FIRST_BLOCK[0], timesteps).double()
    positions = conditioner.concept_positions(prompts, "monet")
    kept = []
    for segment in conditioner.token_segments(prompts):
        inside = [[i for i in where if segment.offset <= i < segment.offset + len(segment.ids[0])]
                  for where in positions]
        kept.append(torch.stack([states[:, row, where].mean(dim=1) for row, where in enumerate(inside)]).mean(dim=0))
    empty = conditioner.prompt_kv_inputs(conditioner.encode_unconditional(1), FIRST_BLOCK[0], timesteps).double()
    kept.append(empty[:, 0, conditioner.unconditional_positions()].flatten(0, 1))
    return torch.cat(kept)


def test_closed_form_keeps_the_kept_states_and_maps_the_target_onto_its_anchor(solved):
    family, pipe = solved
    conditioner = conditioner_for(pipe, guidance_scale=3.0)
    solve_t = conditioner.sampler_timesteps(CLOSED_FORM["sampling_steps"])
    kept = _kept_states(conditioner, solve_t)
    for request_id in pipe.unlearning_ledger.ids():
        for layer in FIRST_BLOCK:
            _, delta = _first_block_delta(pipe, request_id, layer)
            moved = (kept @ delta.T).norm(dim=1)
            # float32 factors: B @ A differs from the float64 solution by ~1e-7 of |D| |s|
            bound = 1e-5 * delta.norm() * kept.norm(dim=1)
            assert torch.all(moved <= bound), (request_id, layer, float((moved / bound).max()))
    # The target's tokens land near their aim W0 (a + g (a - x)) at the solve's timesteps. At other timesteps (40
    # spread over the schedule) the gap is measured and printed: the solve holds nothing there
    # (docs/concepts/sd3-flux.md).
    record = pipe.unlearning_ledger.requests[0]
    gaps = {}
    for name, timesteps in (("solved", solve_t), ("other_t", torch.linspace(1000, 5, 40))):
        states = PromptStates(conditioner, FIRST_BLOCK[0], timesteps.cpu())
        keys, aims = mapping_keys(pipe, "van gogh", "", record.prompts, states=states,
                                  negative_guidance=ClosedFormConfig().negative_guidance)
        num = den = 0.0
        for layer in FIRST_BLOCK:
            w0, delta = _first_block_delta(pipe, "r0001", layer)
            w = w0 + delta + _first_block_delta(pipe, "r0002", layer)[1]  # the ledger's model: both requests
            num += float((keys @ w.T - aims @ w0.T).square().sum())
            den += float((keys @ w0.T - aims @ w0.T).square().sum())
        gaps[name] = (num / den) ** 0.5  # 1 on the base model, 0 when mapped exactly
    print(family, "closed-form mapping gap", {k: round(v, 3) for k, v in gaps.items()})
    assert gaps["solved"] < 0.5, gaps  # least squares in the free directions; the kept states cannot move


# Unrelated prompts: every built-in object outside the kept vocabulary (and the two removed concepts).
UNRELATED = [o for o in DEFAULT_VOCABULARY["object"] if o not in {*CF_VOCABULARY["object"], "dog"}]
CLOSED_FORM_SELECTIVITY_OPEN = pytest.mark.xfail(strict=True, reason=(
    "measured with the tiny T5 keeping words apart (TINY_T5_SELF_ATTENTION_BIAS): first joint block's relative K/V "
    "change at the concept's tokens (K and V averaged) on the ESD test's 4 timesteps, 'van gogh' vs the median over "
    "26 unrelated objects, tiny seeds 0-3: Flux 2.30/0.68, 2.45/1.28, 2.42/1.45, 2.22/1.05 (2 of 4 seeds pass); SD3 "
    "2.27/2.44, 2.48/1.41, 1.99/1.86, 2.22/1.51 (none). With words kept apart the target's states still share most of "
    "the 64-wide text stream with the kept ones (SD3: 66% of the target inside the kept span, Flux 35%), and the "
    "solve's map covers the rest. Widening SD3's stream to 256 (T5 256) left it at 2.36/1.80. On the taught world "
    "(dit_world) the velocity moves as ESD's test measures it: target / median of its 10 unrelated prompts, seeds "
    "0-3, SD3 1.02/0.34, 1.42/1.54, 0.37/0.55, 1.27/1.01; Flux 0.51/0.02, 0.40/0.16, 0.19/0.48, 0.27/0.18. Open: "
    "needs a text stream wide enough to keep many concepts next to the target, as real models have; the recipe "
    "does not choose the closed form on SD3 / Flux.")
)


@pytest.mark.parametrize("family", [pytest.param("sd3", marks=CLOSED_FORM_SELECTIVITY_OPEN),
                                    pytest.param("flux", marks=CLOSED_FORM_SELECTIVITY_OPEN)])
def test_closed_form_moves_the_target_more_than_unrelated_prompts(family):
    ratios = {seed: _closed_form_selectivity(family, seed) for seed in (0, 1)}  # one seed could pass by chance
    assert all(target > 2 * unrelated for target, unrelated in ratios.values()), ratios


def _closed_form_selectivity(family: str, seed: int) -> tuple[float, float]:
    """(target, median unrelated): relative first-block K/V change at the concept's tokens after removing "van
    gogh" in closed form from the tiny pipeline of ``seed``."""
    pipe = du.attach(FAMILIES[family][0](seed=seed))
    pipe.unlearn("van gogh", domain="style", **CLOSED_FORM)
    conditioner = conditioner_for(pipe, guidance_scale=3.0)
    items = [("a painting in van gogh style", "van gogh")] + [(f"a photo of a {o}", o) for o in UNRELATED]
    prompts = [p for p, _ in items]
    _, timesteps = base_trajectory(pipe, conditioner, prompts[:2])  # the x_t's timesteps of the ESD test
    states = conditioner.prompt_kv_inputs(conditioner.encode(prompts), FIRST_BLOCK[0], timesteps).double()
    moved = torch.zeros(len(items))
    for layer in FIRST_BLOCK:
        w0, delta = _first_block_delta(pipe, "r0001", layer)
        for i, (prompt, concept) in enumerate(items):
            x = states[:, i, conditioner.concept_positions([prompt], concept)[0]]
            moved[i] += float((x @ delta.T).norm() / (x @ w0.T).norm()) / len(FIRST_BLOCK)
    target, unrelated = float(moved[0]), float(moved[1:].median())
    print(family, seed, "closed-form relative K/V change at the concept's tokens: target", f"{target:.3f}",
          "unrelated median", f"{unrelated:.3f}", "max", f"{float(moved[1:].max()):.3f}")
    return target, unrelated


# ------------------------------------------------------------------------------------------- pooled text route
# the weight the pooled text vector (and, for SDXL, the size ids alike in both prompts) enters through
POOLED_PATH = {"sd3": "transformer.time_text_embed.text_embedder.linear_2",
               "flux": "transformer.time_text_embed.text_embedder.linear_2", "sdxl": "unet.add_embedding.linear_1"}
TOKEN_PATH = {"sd3": "transformer.context_embedder", "flux": "transformer.context_embedder"}
ROUTE_BUILDERS = {"sd3": du.testing.tiny_sd3_pipeline, "flux": du.testing.tiny_flux_pipeline,
                  "sdxl": du.testing.tiny_sdxl_pipeline}
ROUTE_OTHERS = ["a photo of a cat", "a painting in monet style"]


def _cut(pipe, path):
    """Zero the weight of the module at ``path``: whatever enters it no longer reaches the output."""
    with torch.no_grad():
        component, name = path.split(".", 1)
        getattr(pipe, component).get_submodule(name).weight.zero_()


@pytest.mark.parametrize("family", sorted(ROUTE_BUILDERS))
def test_conditioning_routes_is_exactly_zero_for_a_route_the_model_does_not_read(family):
    pipe = ROUTE_BUILDERS[family](seed=0)
    _cut(pipe, POOLED_PATH[family])  # the pooled vector enters through this weight only
    rows = conditioning_routes(pipe, "a painting in van gogh style", ROUTE_OTHERS, steps=2)
    assert [r.other for r in rows] == ROUTE_OTHERS
    assert all(r.pooled == 0.0 and r.tokens > 0 for r in rows), rows  # swapping it changes no bit of the output


@pytest.mark.parametrize("family", sorted(TOKEN_PATH))
def test_conditioning_routes_gives_the_pooled_vector_the_whole_change_when_tokens_are_cut(family):
    pipe = ROUTE_BUILDERS[family](seed=0)
    _cut(pipe, TOKEN_PATH[family])  # every token state becomes the context embedder's bias
    rows = conditioning_routes(pipe, "a painting in van gogh style", ROUTE_OTHERS, steps=2)
    assert all(r.tokens == 0.0 and r.pooled == 1.0 for r in rows), rows  # the pooled swap is the full swap


def test_conditioning_routes_refuses_pipelines_without_pooled_text_and_bad_input():
    with pytest.raises(ValueError, match="no pooled text vector.*SDXL, SD3 and Flux"):
        conditioning_routes(du.testing.tiny_pipeline(seed=0), "a photo of a cat", ["a photo of a dog"])
    pipe = du.testing.tiny_flux_pipeline(seed=0)
    with pytest.raises(TypeError, match="others a list of strings"):
        conditioning_routes(pipe, "a photo of a cat", "a photo of a dog")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        conditioning_routes(pipe, "a photo of a cat", ["a photo of a dog"], steps=0)
    with pytest.raises(ValueError, match=r"guidance_scale must be a number >= 0, got nan"):
        conditioning_routes(pipe, "a photo of a cat", ["a photo of a dog"], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="give the same output"):
        conditioning_routes(pipe, "a photo of a cat", ["a photo of a cat"], steps=1)


def _reloaded_bit_exact(pipe, build, path):
    """Save ``pipe``'s two-request ledger to ``path``, load it onto a fresh base; adapters and images identical."""
    pipe.save_unlearning(path)
    other = du.attach(build(seed=0))
    assert other.load_unlearning(path) == ["r0001", "r0002"]
    for request_id in ("r0001", "r0002"):
        mine, theirs = pipe.request_adapter(request_id), other.request_adapter(request_id)
        assert mine.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(mine.tensors[k], theirs.tensors[k]) for k in mine.tensors)
    assert torch.equal(generate(other, **SIZE), generate(pipe, **SIZE))
    return other


def test_closed_form_requests_save_load_and_roll_back_with_a_re_solve(solved, tmp_path):
    family, pipe = solved
    build = FAMILIES[family][0]
    other = _reloaded_bit_exact(pipe, build, tmp_path / "ledger")
    # rolling back the first request re-solves the second without it: the same as solving "dog" alone
    stored = other.request_adapter("r0002").deltas()
    other.rollback("r0001")
    assert other.removed_concepts == ["dog"] and other.unlearning_ledger.history[-1]["resolved"] == ["r0002"]
    fresh = du.attach(build(seed=0))
    alone = fresh.request_adapter(fresh.unlearn("dog", domain="object", **CLOSED_FORM).request_id).deltas()
    resolved = other.request_adapter("r0002").deltas()
    for layer, delta in alone.items():  # float32 factor rounding apart
        torch.testing.assert_close(resolved[layer], delta, rtol=0, atol=1e-5 * max(float(delta.abs().max()), 1e-30))
    assert any(not torch.allclose(stored[k], resolved[k], atol=1e-6) for k in FIRST_BLOCK)  # it did change
    other.rollback("r0002")
    assert other.removed_concepts == []
    assert (generate(other, **SIZE) - generate(build(seed=0), **SIZE)).abs().max() < 1e-5


def test_closed_form_warns_when_the_kept_states_fill_the_text_stream():
    pipe = du.attach(du.testing.tiny_sd3_pipeline(seed=0))
    styles = [s for s in DEFAULT_VOCABULARY["style"] if s != "van gogh"]  # 39 styles x 2 segments x 2 timesteps
    with pytest.warns(UserWarning, match=r"closed_form changes nothing while removing 'van gogh': what it keeps fills "
                                         r"the K/V layers' 64-wide input space .* or solve on fewer timesteps"):
        record = pipe.unlearn("van gogh", domain="style", method="closed_form", vocabulary=styles, sampling_steps=2)
    assert record.regularizers[0]["report"]["solve_rank"] == 0
    assert all(t.abs().max() == 0 for k, t in pipe.request_adapter(record.request_id).tensors.items()
               if k.endswith("lora_B"))


def test_the_recommended_method_on_joint_transformers_is_the_trained_one(tmp_path):
    # With its defaults (every built-in concept, 50 solve timesteps) the closed form keeps thousands of states in a
    # joint block's text stream and changes nothing (the test above fills it with far fewer): the recipe trains.
    from diffusers_unlearn.cli.unlearn import build_request, request_inputs
    from diffusers_unlearn.families.registry import family_of
    from diffusers_unlearn.objectives import build_objective_config
    from diffusers_unlearn.plan import PlanError, parse_plan, run_plan

    families = {name: family_of(build(seed=0)) for name, build in ROUTE_BUILDERS.items()}
    families["sd"] = family_of(du.testing.tiny_pipeline(seed=0))
    for name, family in families.items():
        built = du.UnlearnRequest.build("dog", domain="object", family=family)
        assert built.method.method == ("esd" if name in FAMILIES else "closed_form"), name
    assert du.UnlearnRequest.build("dog", domain="object").method.method == "closed_form"  # family not known
    # the closed form's object settings (guidance 2, keep weight 5) stay with the closed form
    on_sd3 = du.UnlearnRequest.build("dog", domain="object", family=families["sd3"])
    assert on_sd3.method == build_objective_config("esd")
    args = parse_unlearn_flags("tiny-sd3", "--concept", "dog", "--domain", "object")
    inputs, _ = request_inputs(args)
    assert build_request(args, inputs).method.method == "closed_form"  # before the model loads
    assert build_request(args, inputs, families["sd3"]).method.method == "esd"  # once it has
    # pipe.unlearn resolves it with its own family
    pipe = du.attach(du.testing.tiny_flux_pipeline(seed=0))
    pipe.unlearning_max_sequence_length = 16  # ESD's default 200 steps x 50 sampling steps: keep them cheap
    assert pipe.unlearn("van gogh", domain="style", progress=False).method == "esd"
    # a plan without method or training resolves it when it runs on the model, and a resumed run agrees
    plan = {"model": "tiny-sd3", "output": str(tmp_path / "out"),
            "requests": [{"concept": "dog", "domain": "object", "sampling_steps": 2, "num_trajectories": 1}]}
    assert parse_plan(plan).requests[0].to_request().method.method == "closed_form"
    result = run_plan(parse_plan(plan), log=None)
    assert [r.method for r in result.pipe.unlearning_ledger.requests] == ["esd"]
    assert run_plan(parse_plan(plan), log=None).skipped == ["r0001"]
    plan["requests"] = [{"concept": "dog", "domain": "object", "ridge": 0.1}]  # a closed-form option
    plan["output"] = str(tmp_path / "other")
    with pytest.raises(PlanError, match="request 1 \\('dog'\\) on this model gets the recommended method 'esd': "
                                        ".*ridge.*name a method in the plan"):
        run_plan(parse_plan(plan), log=None)
    assert not (tmp_path / "other").exists()


def test_gradient_projection_keeps_the_first_block_exactly_and_reports_the_others(stream):
    family, pipe, _ = stream
    report = pipe.unlearning_ledger.requests[0].regularizers[0]["report"]
    assert set(report["columns_per_layer"]) == set(pipe.request_adapter("r0001").layers)
    # held-out x_t (another seed than training's): first joint block kept to float rounding at every timestep
    kept = text_stream_change(pipe, "r0001", "monet", domain="style", seed=11, samples_per_step=2)
    removed = text_stream_change(pipe, "r0001", "van gogh", domain="style", seed=11, samples_per_step=2)
    first = [layer for layer in kept if layer.startswith("transformer_blocks.0.")]
    later = [layer for layer in kept if layer not in first]
    assert first and later
    assert max(kept[layer] for layer in first) < 1e-4, kept
    assert min(removed[layer] for layer in first) > 1e-2, removed
    # later blocks read image-dependent text states: kept on the collected x_t, measured (not exact) on others
    print(family, "held-out relative K/V change, kept:", {k: f"{v:.1e}" for k, v in kept.items()},
          "target:", {k: f"{v:.1e}" for k, v in removed.items()})
    assert all(kept[layer] < removed[layer] for layer in later), (kept, removed)


def test_ledger_save_and_load_is_bit_exact(stream, tmp_path):
    family, pipe, _ = stream
    build, _, _ = FAMILIES[family]
    _reloaded_bit_exact(pipe, build, tmp_path / "ledger")
    with pytest.raises(du.LedgerError, match="fingerprint"):  # another base (seed) is refused, nothing changes
        du.attach(build(seed=1)).load_unlearning(tmp_path / "ledger")


def test_saved_folder_and_loras_load_with_plain_diffusers(stream, tmp_path):
    family, pipe, folder = stream
    build, class_name, _ = FAMILIES[family]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == class_name
    with safe_open(str(folder / "unlearning" / "lora" / "r0001.safetensors"), framework="pt") as handle:
        assert all(key.startswith("transformer.transformer_blocks.") for key in handle.keys())
    out = check_with_plain_diffusers(tmp_path, pipe, folder, build(seed=0), class_name, call_kwargs=SIZE)
    assert out.count("LORA") == 2


def test_two_request_stream_with_rollback_from_the_saved_folder(stream):
    family, pipe, folder = stream
    _, _, ready_name = FAMILIES[family]
    loaded = getattr(du, ready_name).from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.removed_concepts == ["van gogh", "dog"] and loaded.unlearning_mode == "folded"
    assert loaded.base_fingerprint == pipe.base_fingerprint
    with pipe.audit("r0001", mode="without"):
        expected = generate(pipe, **SIZE)
    loaded.rollback("r0001")
    assert loaded.removed_concepts == ["dog"]
    assert (generate(loaded, **SIZE) - expected).abs().max() < 1e-5  # folded vs stacked: float32 rounding
    card = loaded.unlearned_model_card().content
    assert "dog" in card and "add_k_proj" in card and "in the transformer weights" in card


def test_bf16_model_with_gradient_checkpointing_trains_float32_adapters():
    pipe = du.attach(du.testing.tiny_sd3_pipeline(seed=0).to(dtype=torch.bfloat16))
    record = pipe.unlearn("van gogh", domain="style", seed=0, training=du.TrainingConfig(
        steps=2, learning_rate=1e-2, gradient_checkpointing=True), sampling_steps=2, num_trajectories=1)
    adapter = pipe.request_adapter(record.request_id)
    assert all(t.dtype == torch.float32 for t in adapter.tensors.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if k.endswith("lora_B"))
    assert torch.isfinite(torch.tensor(record.final_loss))
    assert pipe.transformer.dtype == torch.bfloat16 and not pipe.transformer.is_gradient_checkpointing


def test_bad_input_is_refused_with_what_is_allowed():
    with pytest.raises(TypeError, match="Stable Diffusion 3.*Flux"):
        du.attach(type("NotAPipeline", (), {"transformer": torch.nn.Linear(2, 2)})())
    with pytest.raises(ValueError, match="samples_per_step must be an integer >= 1, got 0"):
        du.GradientProjection(keep=["monet"], samples_per_step=0)
    pipe = du.attach(du.testing.tiny_flux_pipeline(seed=0))
    with pytest.raises(ValueError, match=r"guidance_scale must be a number >= 0, got nan \(not a finite number\)"):
        pipe.unlearn("van gogh", guidance_scale=float("nan"), **FAST)
    assert pipe.removed_concepts == [] and not any(isinstance(m, ad.LoraLayer) for m in pipe.transformer.modules())


def test_tiny_pipelines_are_deterministic_small_and_offline():
    for build, _, _ in FAMILIES.values():
        a, b = build(seed=0), build(seed=0)
        assert all(torch.equal(x, y) for x, y in zip(a.transformer.state_dict().values(),
                                                     b.transformer.state_dict().values()))
        image = generate(a, PROMPT, steps=2)
        assert image.shape == (1, 3, 16, 16)
        assert not torch.equal(build(seed=1).transformer.state_dict()["context_embedder.weight"],
                               a.transformer.state_dict()["context_embedder.weight"])


def test_command_line_plans_and_push_dry_run_on_tiny_sd3_and_flux(tmp_path, capsys):
    from diffusers_unlearn.cli import main

    (tmp_path / "plan.yaml").write_text(
        "model: tiny-flux\noutput: out\ndefaults: {steps: 2, sampling_steps: 2, num_trajectories: 1}\n"
        "requests:\n  - {concept: van gogh, domain: style}\n  - {concept: dog, domain: object, seed: 1}\n"
    )
    assert main(["run", str(tmp_path / "plan.yaml"), "--quiet"]) == 0
    assert "[2/2] 'dog': removed as r0002" in capsys.readouterr().out
    assert du.load_pipeline(tmp_path / "out").removed_concepts == ["van gogh", "dog"]
    code = main(["unlearn", "tiny-sd3", "--concept", "van gogh", "--domain", "style", "--retain", "monet",
                 "--neighbors", "0", "--steps", "2", "--option", "sampling_steps=2", "--option", "num_trajectories=1",
                 "--quiet", "--out", str(tmp_path / "sd3")])
    assert code == 0, capsys.readouterr().err
    assert main(["fold", str(tmp_path / "sd3"), "--rollback", "r0001", "--out", str(tmp_path / "sd3-base"),
                 "--quiet"]) == 0
    assert du.load_pipeline(tmp_path / "sd3-base").removed_concepts == []
    capsys.readouterr()
    assert main(["push", str(tmp_path / "sd3"), "--repo-id", "user/sd3-unlearned", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "transformer/diffusion_pytorch_model.safetensors" in out and "van gogh" in out


@pytest.mark.parametrize("family, default", [("sd3", 256), ("flux", 512)])
def test_unlearning_sees_the_text_length_generation_uses(family, default):
    pipe = FAMILIES[family][0](seed=0)
    assert conditioner_for(pipe).max_sequence_length == default  # the pipeline's own max_sequence_length default
    pipe.unlearning_max_sequence_length = 24  # a deployment that generates with max_sequence_length=24
    conditioner = conditioner_for(pipe)
    assert conditioner.max_sequence_length == 24
    tokens = conditioner.encode(["a painting in van gogh style"]).hidden_states.shape[1]
    assert tokens == 24 + (int(pipe.tokenizer_max_length) if family == "sd3" else 0)
    pipe.unlearning_max_sequence_length = 0
    with pytest.raises(ValueError, match="unlearning_max_sequence_length must be an integer >= 1, got 0"):
        conditioner_for(pipe)
