"""SD3 and Flux (joint transformers, flow matching) on the tiny offline pipelines: erasure, gradient projection's
per-block invariant, save/load, plain-diffusers loads of the folder and the LoRAs, rollback, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from conftest import PROMPT, generate
from deploy_helpers import check_with_plain_diffusers

import diffusers_unlearn as du
from diffusers_unlearn import adapters as ad
from diffusers_unlearn.analysis import text_stream_change
from diffusers_unlearn.families import conditioner_for

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
                 regularizers=[du.GradientProjection(retain=["monet"], neighbors=0)], **FAST)
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


ERASURE_OPEN = pytest.mark.xfail(strict=True, reason=(
    "measured after 6 ESD steps, relative velocity change target vs 'a photo of a cat': tiny SD3 0.18 vs 0.19, "
    "tiny Flux 0.09 vs 0.11. The tiny transformers' velocity depends on their text tokens by ~0.2-0.3% (the pooled "
    "text does the rest), so a K/V edit moves every prompt alike. Padding T5 to 8 tokens instead "
    "(unlearning_max_sequence_length) raises the token share ~10x but not the selectivity: sd3 0.081 vs 0.071, flux "
    "0.067 vs 0.041. Open: needs tiny models whose concept tokens carry the image, i.e. trained ones."))


@pytest.mark.parametrize("family", [pytest.param("sd3", marks=ERASURE_OPEN), pytest.param("flux", marks=ERASURE_OPEN)])
def test_esd_moves_the_target_velocity_more_than_an_unrelated_prompt(family):
    pipe = du.attach(FAMILIES[family][0](seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    conditioner = conditioner_for(pipe, guidance_scale=3.0)
    cond = conditioner.encode(["a painting in van gogh style", "a photo of a cat"])
    with pipe.audit("r0001", mode="without"):  # x_t from the base model's own flow-matching trajectories
        latents, timesteps = conditioner.sample_trajectory(
            pipe.transformer, cond, conditioner.encode_unconditional(2), steps=4, guidance_scale=3.0,
            generator=torch.Generator().manual_seed(7))
        before = torch.stack([conditioner.predict(pipe.transformer, latents[s], timesteps[s], cond) for s in range(4)])
    after = torch.stack([conditioner.predict(pipe.transformer, latents[s], timesteps[s], cond) for s in range(4)])
    moved = (after - before).float().flatten(2).norm(dim=2) / before.float().flatten(2).norm(dim=2)  # [steps, 2]
    target, unrelated = moved[:, 0].mean().item(), moved[:, 1].mean().item()
    print(family, "relative velocity change: target", f"{target:.3f}", "unrelated", f"{unrelated:.3f}")
    assert target > 2 * unrelated, (target, unrelated)


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
    pipe.save_unlearning(tmp_path / "ledger")
    other = du.attach(build(seed=0))
    assert other.load_unlearning(tmp_path / "ledger") == ["r0001", "r0002"]
    for request_id in ("r0001", "r0002"):
        mine, theirs = pipe.request_adapter(request_id), other.request_adapter(request_id)
        assert mine.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(mine.tensors[k], theirs.tensors[k]) for k in mine.tensors)
    assert torch.equal(generate(other, **SIZE), generate(pipe, **SIZE))
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
        du.GradientProjection(retain=["monet"], samples_per_step=0)
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
