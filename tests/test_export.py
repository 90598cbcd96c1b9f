"""export.py: requests as exact diffusers LoRAs, and the folder checks of save_unlearned (the end-to-end loads by
plain diffusers are in test_deploy.py)."""

from __future__ import annotations

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn.kv.adapters import RequestAdapter
from diffusers_unlearn.publishing.export import LoraExport, exact_factors, lora_state_dict


def _masked(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < density
    return torch.randn(shape, generator=generator) * mask


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_a_masked_dense_delta_is_exported_bit_for_bit_at_the_smallest_exact_rank(shape, density):
    delta = _masked(shape, density, seed=len(shape) + int(100 * density))
    adapter = RequestAdapter.from_dense({"layer": delta})
    a, b, scale = exact_factors(adapter, "layer")
    assert torch.equal(b @ a * scale, delta)  # one factor is a 0/1 selection: each entry is one product with 1
    rows, cols = int(delta.ne(0).any(1).sum()), int(delta.ne(0).any(0).sum())
    assert a.shape[0] == max(1, min(rows, cols)) <= min(shape)


def test_a_lora_exports_its_own_factors_with_per_layer_rank_and_alpha():
    generator = torch.Generator().manual_seed(0)
    tensors = {"k.lora_A": torch.randn(2, 8, generator=generator), "k.lora_B": torch.randn(5, 2, generator=generator),
               "v.lora_A": torch.randn(4, 8, generator=generator), "v.lora_B": torch.randn(5, 4, generator=generator)}
    adapter = RequestAdapter("lora", tensors, {"k": 0.5, "v": 3.0})
    assert all(x is y for x, y in zip(exact_factors(adapter, "k"), (tensors["k.lora_A"], tensors["k.lora_B"], 0.5)))
    weights, config, ranks = lora_state_dict(adapter)
    assert ranks == {"k": 2, "v": 4} and config["rank_pattern"] == ranks
    assert sorted(weights) == ["k.lora_A.weight", "k.lora_B.weight", "v.lora_A.weight", "v.lora_B.weight"]
    for layer, rank in ranks.items():  # peft rebuilds scale = alpha / r for each layer
        assert config["alpha_pattern"][layer] / rank == pytest.approx(adapter.scales[layer], rel=1e-12)
    export = LoraExport("r0001", None, "r0001.safetensors", "lora", ranks, 123)
    assert export.max_rank == 4 and export.to_dict()["min_rank"] == 2


def test_save_unlearned_refuses_a_folder_of_other_files_and_leaves_them(tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and is not an unlearned pipeline folder"):
        pipe.save_unlearned(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and mine.read_text() == "keep me"
