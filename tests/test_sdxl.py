"""The tiny SDXL pipeline: embeddings from the concatenated hidden states, gradient projection, save_unlearned,
loading with plain diffusers, exported LoRAs and the ready class."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, generate
from deploy_helpers import check_with_plain_diffusers

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """Two SDXL requests (projection-constrained LoRA, masked dense delta), saved. Tests must not change it."""
    pipe = du.attach(du.testing.tiny_sdxl_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[du.GradientProjection(keep=["monet"])],
                 **dict(FAST, steps=8))
    pipe.unlearn("dog", domain="object", seed=1, regularizers=[du.SelectiveFinetune(top_k=0.1)], **FAST)
    folder = tmp_path_factory.mktemp("sdxl") / "saved"
    pipe.save_unlearned(folder)
    return pipe, folder


def test_concept_embedding_is_the_concatenated_hidden_state_the_unet_sees(sdxl):
    pipe, _ = sdxl
    embedding = du.concept_embedding(pipe, "monet", domain="style")
    assert embedding.shape == (pipe.unet.config.cross_attention_dim,) == (32,)
    # By hand: each encoder's penultimate hidden state at the concept's tokens, concatenated (16 + 16), averaged.
    concept_ids = pipe.tokenizer("monet", add_special_tokens=False).input_ids
    vectors = []
    for template in du.TEMPLATES["style"]:
        prompt = template.format("monet")
        halves = []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = encoder(ids, output_hidden_states=True).hidden_states[-2][0]
            row = ids[0].tolist()
            start = next(i for i in range(len(row)) if row[i : i + len(concept_ids)] == concept_ids)
            halves.append(hidden[start : start + len(concept_ids)].mean(0))
        vectors.append(torch.cat(halves))
    torch.testing.assert_close(embedding, torch.stack(vectors).mean(0), rtol=1e-5, atol=1e-6)


def test_gradient_projection_keeps_the_retained_concept_on_sdxl(sdxl):
    pipe, _ = sdxl
    artifact = pipe.request_adapter("r0001")
    base = pipe._unlearning().base_weights
    kept = du.concept_embedding(pipe, "monet")
    target = du.concept_embedding(pipe, "van gogh", domain="style")

    def change(vector):
        return max(float((artifact.delta(n) @ vector).norm() / (base[n] @ vector).norm()) for n in artifact.layers)

    assert len(artifact.layers) == len(ad.kv_module_names(pipe.unet)) > 0
    assert change(kept) < 1e-4
    assert change(target) > 1e-2


def test_sdxl_folder_and_loras_work_with_plain_diffusers_in_a_fresh_process(sdxl, tmp_path):
    pipe, folder = sdxl
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    out = check_with_plain_diffusers(tmp_path, pipe, folder, du.testing.tiny_sdxl_pipeline(seed=0),
                                     "StableDiffusionXLPipeline")
    assert out.count("LORA") == 2


def test_sdxl_ready_class_restores_the_ledger_and_rolls_back(sdxl):
    pipe, folder = sdxl
    loaded = du.UnlearnStableDiffusionXLPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.removed_concepts == ["van gogh", "dog"] and loaded.unlearning_mode == "folded"
    assert loaded.base_fingerprint == pipe.base_fingerprint
    with pipe.audit("r0001", mode="without"):
        expected = generate(pipe)
    loaded.rollback("r0001")
    assert (generate(loaded) - expected).abs().max() < 1e-5
