"""Deployment on the tiny SD pipeline: LoRA export, save_unlearned, loading with plain diffusers, restoring the
ledger from a saved folder, audit/rollback on it, refusals."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import FAST, generate, kv_state
from deploy_helpers import check_with_plain_diffusers
from diffusers import DiffusionPipeline
from safetensors import safe_open

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.publishing.export import exact_factors, saved_files

EXPECTED_FILES = [
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unlearning/adapters/r0001.safetensors",
    "unlearning/adapters/r0002.safetensors",
    "unlearning/adapters/r0003.safetensors",
    "unlearning/base_kv.safetensors",
    "unlearning/ledger.json",
    "unlearning/lora/r0001.safetensors",
    "unlearning/lora/r0002.safetensors",
    "unlearning/lora/r0003.safetensors",
    "unlearning/state.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Three requests of the three artifact shapes (LoRA rank 4, masked dense delta, full-rank LoRA with per-layer
    ranks), saved with save_unlearned. Tests must not change ``pipe``."""
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[du.GradientProjection(keep=["monet"])], **FAST)
    pipe.unlearn("dog", domain="object", seed=1, regularizers=[du.SelectiveFinetune(top_k=0.1)], **FAST)
    pipe.unlearn("cat", domain="object", seed=2, rank="full", **FAST)
    folder = tmp_path_factory.mktemp("deployed") / "saved"
    before = kv_state(pipe)
    assert pipe.save_unlearned(folder, base_model="someone/tiny-base") == folder
    after = kv_state(pipe)
    assert pipe.unlearning_mode == "stacked"  # the mode the pipeline had, with the same adapters
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    return pipe, folder


def test_saved_folder_layout(deployed):
    pipe, folder = deployed
    # adapters are named by request id and content (adapters/r0001-<sha256[:16]>.safetensors)
    assert [re.sub(r"^(unlearning/adapters/r[0-9]+)-[0-9a-f]{16}\.", r"\1.", f) for f in saved_files(folder)] == \
        EXPECTED_FILES
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    state = json.loads((folder / "unlearning" / "state.json").read_text())
    assert state["mode"] == "folded" and state["requests"] == ["r0001", "r0002", "r0003"]
    assert state["base_fingerprint"] == pipe.base_fingerprint and state["base_model"] == "someone/tiny-base"
    ledger = json.loads((folder / "unlearning" / "ledger.json").read_text())
    assert [r["concept"] for r in ledger["requests"]] == ["van gogh", "dog", "cat"]
    # The saved UNet is plain (no peft keys) and holds base + all requests.
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert not any("lora" in k for k in keys)
        name = ad.kv_module_names(pipe.unet)[0]
        saved_weight = f.get_tensor(f"{name}.weight")
    state_ = pipe._unlearning()
    delta = sum(state_.artifacts[i].delta(name) for i in pipe.unlearning_ledger.ids())
    torch.testing.assert_close(saved_weight, state_.base_weights[name] + delta, rtol=0, atol=1e-6)


def test_dense_export_is_exact_and_small(deployed):
    pipe, _ = deployed
    artifact = pipe.request_adapter("r0002")
    assert artifact.kind == "dense"
    for layer in artifact.layers:
        a, b, scale = exact_factors(artifact, layer)
        delta = artifact.delta(layer)
        assert torch.equal(b @ a * scale, delta), layer  # bit for bit
        assert a.shape[0] <= min(delta.shape)
        nonzero_rows, nonzero_cols = int(delta.ne(0).any(1).sum()), int(delta.ne(0).any(0).sum())
        assert a.shape[0] == max(1, min(nonzero_rows, nonzero_cols))


def test_export_metadata_keeps_per_layer_ranks_and_alphas(deployed, tmp_path):
    pipe, _ = deployed
    export = pipe.export_lora("r0003", tmp_path, weight_name="cat.safetensors")
    assert export.path == tmp_path / "cat.safetensors" and export.kind == "lora"
    assert len(set(export.ranks.values())) > 1  # rank="full": min(out, in) differs between layers
    with safe_open(str(export.path), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert all(k.startswith("unet.") for k in keys) and len(keys) == 2 * len(export.ranks)
    config = {k.removeprefix("unet."): v for k, v in metadata.items()}
    assert config["rank_pattern"] == export.ranks
    artifact = pipe.request_adapter("r0003")
    for layer, rank in export.ranks.items():
        assert config["alpha_pattern"][layer] / rank == pytest.approx(artifact.scales[layer])
    with pytest.raises(ValueError, match="weight_name must be a plain file name"):
        pipe.export_lora("r0003", tmp_path, weight_name="../x.safetensors")
    with pytest.raises(du.UnknownRequestError, match="r0009"):
        pipe.export_lora("r0009", tmp_path)


def test_saved_folder_and_loras_work_with_plain_diffusers_in_a_fresh_process(deployed, tmp_path):
    pipe, folder = deployed
    out = check_with_plain_diffusers(tmp_path, pipe, folder, du.testing.tiny_pipeline(seed=0),
                                     "StableDiffusionPipeline")
    assert out.count("LORA") == 3


def test_loading_the_folder_restores_base_ledger_and_adapters(deployed, caplog):
    pipe, folder = deployed
    loaded = du.attach(DiffusionPipeline.from_pretrained(folder))
    loaded.set_progress_bar_config(disable=True)
    state, original = loaded._unlearning(), pipe._unlearning()
    assert loaded.unlearning_mode == "folded"
    assert loaded.removed_concepts == ["van gogh", "dog", "cat"]
    assert loaded.base_fingerprint == pipe.base_fingerprint
    for name, weight in original.base_weights.items():
        assert torch.equal(state.base_weights[name], weight), name
    for request_id, artifact in original.artifacts.items():
        for key, tensor in artifact.tensors.items():
            assert torch.equal(state.artifacts[request_id].tensors[key], tensor), key

    with pipe.audit("r0002"):
        only_r2 = generate(pipe)
    with loaded.audit("r0002"):
        assert (generate(loaded) - only_r2).abs().max() < 1e-5
    with pipe.audit("r0001", mode="without"):
        without_r1 = generate(pipe)

    with caplog.at_level(logging.INFO, logger="diffusers_unlearn"):
        dropped = loaded.rollback("r0001")
    assert dropped.concept == "van gogh" and loaded.removed_concepts == ["dog", "cat"]
    assert "re-folded the base weights" in caplog.text and "with the remaining requests" in caplog.text
    assert loaded.unlearning_mode == "folded"
    assert not any(isinstance(m, ad.LoraLayer) for m in loaded.unet.modules())
    assert (generate(loaded) - without_r1).abs().max() < 1e-5
    loaded.unfold()  # back to the remaining requests stacked on the true base
    assert loaded.unet.active_adapters() == ["unlearn_stack"]
    assert (generate(loaded) - without_r1).abs().max() < 1e-5


def test_ready_class_loads_restores_and_saves_under_the_parent_name(deployed, tmp_path):
    pipe, folder = deployed
    loaded = du.UnlearnStableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(loaded, du.UnlearnMixin) and type(loaded).__name__ == "UnlearnStableDiffusionPipeline"
    assert loaded.unlearning_ledger.ids() == ["r0001", "r0002", "r0003"] and loaded.unlearning_mode == "folded"
    loaded.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # A ready class on a model that is not an unlearned folder starts an empty ledger on its weights.
    fresh = du.UnlearnStableDiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert fresh.removed_concepts == [] and fresh.base_fingerprint != pipe.base_fingerprint
    # save_unlearned of a ready-class pipeline also names the parent class.
    loaded.save_unlearned(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    state = json.loads((tmp_path / "again" / "unlearning" / "state.json").read_text())
    assert state["base_model"] == "someone/tiny-base"


def test_plain_save_pretrained_of_a_stacked_pipeline_saves_the_folded_weights(deployed, tmp_path):
    pipe, _ = deployed
    before = kv_state(pipe)
    pipe.save_pretrained(tmp_path / "plain")  # diffusers would otherwise write peft keys: random K/V on load
    after = kv_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    pipe.fold()
    try:
        folded = generate(pipe)
    finally:
        pipe.unfold()
    plain = DiffusionPipeline.from_pretrained(tmp_path / "plain")
    plain.set_progress_bar_config(disable=True)
    # Exact: float32 weights round-trip safetensors bit for bit, and a folded pipeline has no peft layers left, so
    # plain diffusers runs the same computation in this process.
    assert torch.equal(generate(plain), folded)
    assert not (tmp_path / "plain" / "unlearning").exists()
    with pipe.audit("r0001"), pytest.raises(ValueError, match="inside audit"):
        pipe.save_pretrained(tmp_path / "partial")


def test_ready_class_fetches_the_ledger_of_a_hub_repo(deployed, monkeypatch):
    """For a Hub id, diffusers downloads only the components: the ready class fetches unlearning/ as well."""
    _, folder = deployed
    calls = []
    original = DiffusionPipeline.from_pretrained.__func__

    def from_hub(cls, name, **kwargs):  # stands in for the download: the same files, under the Hub id's name
        pipe = original(cls, folder)
        pipe.register_to_config(_name_or_path=name)
        pipe.unet.register_to_config(_name_or_path="hub-cache/unet")  # no local path points at the folder
        return pipe

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(from_hub))
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    loaded = du.UnlearnStableDiffusionPipeline.from_pretrained("someone/unlearned", token="t0k", revision="v1")
    assert loaded.removed_concepts == ["van gogh", "dog", "cat"] and loaded.unlearning_mode == "folded"
    assert calls == [("someone/unlearned", {"allow_patterns": ["unlearning/*"], "revision": "v1", "token": "t0k",
                                            "cache_dir": None, "local_files_only": False})]


def test_merge_strategy_saves_loads_and_rolls_back(tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    for i, concept in enumerate(("van gogh", "monet", "dog")):
        pipe.unlearn(concept, seed=i, strategy="ties", **dict(FAST, steps=3))
    pipe.save_unlearned(tmp_path / "merged")
    pipe.fold()
    folded = generate(pipe)
    with pipe.audit("r0002", mode="without"):
        without = generate(pipe)
    plain = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(generate(plain), folded)  # exact: see the test above (bit-exact weights, no peft layers)
    loaded = du.attach(plain)
    assert isinstance(loaded._unlearning().strategy, du.MergeStrategy)
    loaded.rollback("r0002")  # the remaining two are merged again from their own deltas
    # exact: audit(mode="without") merged the same two saved deltas onto the same base with the same code
    assert torch.equal(generate(loaded), without)
    assert "merge (ties" in (tmp_path / "merged" / "README.md").read_text()


def test_weights_changed_after_loading_warn_and_start_a_new_ledger(deployed):
    _, folder = deployed
    plain = DiffusionPipeline.from_pretrained(folder)
    name = ad.kv_module_names(plain.unet)[0]
    with torch.no_grad():
        plain.unet.get_submodule(name).weight.add_(0.5)
    with pytest.warns(UserWarning, match="not the folded weights saved there"):
        du.attach(plain)
    assert plain.removed_concepts == []


def test_save_refuses_a_foreign_folder_and_a_failed_save_keeps_the_old_one(deployed, tmp_path, monkeypatch):
    pipe, _ = deployed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an unlearned pipeline folder"):
        pipe.save_unlearned(foreign)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    target = tmp_path / "target"
    pipe.save_unlearned(target)
    before = {p: (target / p).read_bytes() for p in saved_files(target)}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("diffusers_unlearn.publishing.model_card.build_model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pipe.save_unlearned(target)
    assert {p: (target / p).read_bytes() for p in saved_files(target)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "target"]  # no temporary folders left
    assert pipe.unlearning_mode == "stacked"


def test_pipelines_without_unet_cross_attention_are_refused(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, DiTPipeline, DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    dit = DiTPipeline(
        transformer=DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        vae=du.testing._tiny_vae(),
        scheduler=DDIMScheduler(),
    )
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*supported: Stable Diffusion 1.x/2.x and SDXL"):
        du.attach(dit)
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(TypeError, match="supported: Stable Diffusion 1.x/2.x and SDXL"):
        du.load_pipeline(tmp_path / "dit")
    unconditional = DDPMPipeline(
        unet=UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         norm_num_groups=8),
        scheduler=DDIMScheduler(),
    )
    with pytest.raises(TypeError, match="UNet2DModel.*supported"):
        du.attach(unconditional)


def test_load_pipeline_names(tmp_path):
    assert type(du.load_pipeline("tiny")).__name__ == "StableDiffusionPipeline"
    assert type(du.load_pipeline("tiny-sdxl")).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(FileNotFoundError, match="is not a world name.*minicanvas: .*tiny: .*tiny-sdxl: "):
        du.load_pipeline(str(tmp_path / "missing" / "model"))
    (tmp_path / "ledger_only").mkdir()
    (tmp_path / "ledger_only" / "ledger.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds a ledger"):
        du.load_pipeline(tmp_path / "ledger_only")
    with pytest.raises(ValueError, match="unknown dtype"):
        du.load_pipeline("tiny", torch_dtype="float8")
