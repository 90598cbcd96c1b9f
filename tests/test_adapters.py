"""adapters.py: request artifacts (LoRA factors or dense deltas) and their peft form on attn2.to_k / to_v."""

from __future__ import annotations

import torch
from conftest import FAST

import diffusers_unlearn as du
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
