"""adapters.py: request artifacts (LoRA factors or dense deltas) and their peft form on attn2.to_k / to_v."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import FAST

import diffusers_unlearn as du
from diffusers_unlearn.engine import ledger
from diffusers_unlearn.kv import adapters as ad


def test_full_rank_lora_and_rank_in_ledger(pipe):
    record = pipe.unlearn("van gogh", domain="style", rank="full", seed=0, **FAST)
    artifact = pipe.request_adapter(record.request_id)
    for layer in artifact.layers:
        a = artifact.tensors[f"{layer}.lora_A"]
        assert a.shape[0] == min(artifact.delta(layer).shape)
    assert record.adapter["kind"] == "lora" and record.training["rank"] == "full"


def test_dense_deltas_get_exact_identity_factors():
    generator = torch.Generator().manual_seed(0)
    wide, tall = torch.randn(3, 5, generator=generator), torch.randn(5, 3, generator=generator)
    artifact = ad.RequestAdapter.from_dense({"wide": wide, "tall": tall})
    assert sorted(artifact.layers) == ["tall", "wide"] and artifact.kind == "dense"
    for layer, delta in (("wide", wide), ("tall", tall)):
        a, b, scale = artifact.lora_factors(layer)
        assert a.shape[0] == min(delta.shape) and scale == 1.0
        assert torch.equal(b @ a, delta)  # one factor is the identity: every product is one entry times 1


def test_installed_artifact_gives_the_unet_exactly_its_delta():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    record = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    artifact = pipe.request_adapter(record.request_id)
    reference = du.testing.tiny_pipeline(seed=0)
    base = {name: w.clone() for name, w in ad.kv_weights(reference.unet).items()}
    ad.install(reference.unet, "manual", artifact)
    ad.activate(reference.unet, ["manual"])
    x = torch.randn(2, next(iter(base.values())).shape[1], generator=torch.Generator().manual_seed(1))
    for name, weight in base.items():
        layer = reference.unet.get_submodule(name)
        expected = x @ (weight + artifact.delta(name)).T + (layer.base_layer.bias if layer.base_layer.bias is not None
                                                            else 0)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # float32, two summation orders


@pytest.mark.parametrize("protection, forms", [
    # nothing protected: the solve moves all 32 input directions, factors (32 x (out + 32)) outgrow every delta
    (dict(vocabulary=[], protect_unconditional=False), {"dense"}),
    # the empty prompt's 16 tokens and 4 concepts kept: a rank-12 change, smaller as factors on the 32 x 32 layers
    # (768 < 1024 numbers) and as a delta on the 16 x 32 ones (512 < 576)
    (dict(vocabulary={"style": ["monet", "picasso"], "object": ["cat", "horse"]}), {"dense", "lora"}),
])
def test_the_closed_form_stores_each_layer_in_the_smaller_form(protection, forms):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.set_progress_bar_config(disable=True)
    record = pipe.unlearn("van gogh", method="closed_form", domain="style", sampling_steps=4, **protection)
    rank = record.regularizers[0]["report"]["solve_rank"]  # request 1: no drift correction, the factors' rank
    artifact = pipe.request_adapter(record.request_id)
    smallest = 0
    for layer in artifact.layers:
        out_features, in_features = artifact.delta(layer).shape
        smallest += 4 * min(out_features * in_features, rank * (out_features + in_features))
    assert artifact.stored_bytes() == smallest  # float32: each layer holds exactly the smaller of the two
    assert {"dense" if artifact.dense_layer(layer) else "lora" for layer in artifact.layers} == forms
    if "lora" in forms:
        layer = next(layer for layer in artifact.layers if not artifact.dense_layer(layer))
        assert artifact.tensors[f"{layer}.lora_A"].shape[0] == rank


def test_a_lora_artifact_with_dense_layers_round_trips_through_the_ledger_file(tmp_path):
    """A "lora" artifact that holds some layers as dense deltas is written, read back bit-exact and checked like any
    other; a layer holding both forms is refused."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"k.lora_A": torch.randn(2, 8, generator=generator), "k.lora_B": torch.randn(5, 2, generator=generator),
               "v.delta": torch.randn(5, 8, generator=generator)}
    artifact = ad.RequestAdapter("lora", tensors, {"k": 0.5, "v": 1.0})
    assert artifact.layers == ["k", "v"] and artifact.dense_layer("v") and not artifact.dense_layer("k")
    a, b, scale = artifact.lora_factors("v")
    assert torch.equal(b @ a * scale, tensors["v.delta"])
    path = tmp_path / "r0001.safetensors"
    data = ledger.adapter_bytes(artifact, "r0001")
    path.write_bytes(data)
    back = ledger.read_adapter(path, hashlib.sha256(data).hexdigest(), "r0001", shapes={"k": (5, 8), "v": (5, 8)})
    assert back.kind == "lora" and all(torch.equal(back.tensors[k], t) for k, t in tensors.items())
    torch.testing.assert_close(back.delta("k"), tensors["k.lora_B"] @ tensors["k.lora_A"] * 0.5, rtol=0, atol=0)
    both = ad.RequestAdapter("lora", {**tensors, "k.delta": torch.zeros(5, 8)}, {"k": 0.5, "v": 1.0})
    with pytest.raises(ledger.LedgerError, match="partner"):
        ledger.check_adapter_values(both, "test")
