"""composition.py: requests put into the UNet stacked (one shared peft adapter) or folded into the weights."""

from __future__ import annotations

import torch
from conftest import generate

from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.kv.composition import combined_deltas


def test_stacked_requests_share_one_adapter_branch(two_requests):
    pipe = two_requests
    assert pipe.unet.active_adapters() == ["unlearn_stack"]
    layer = pipe.unet.get_submodule(ad.kv_module_names(pipe.unet)[0])
    ranks = [pipe.request_adapter(i).tensors[f"{ad.kv_module_names(pipe.unet)[0]}.lora_A"].shape[0]
             for i in pipe.unlearning_ledger.ids()]
    assert layer.lora_A["unlearn_stack"].weight.shape[0] == sum(ranks)


def test_fold_matches_stacked_and_unfold_restores_exactly(two_requests):
    pipe = two_requests
    stacked = generate(pipe)
    pipe.fold()
    try:
        assert pipe.unlearning_mode == "folded"
        assert not any(isinstance(m, ad.LoraLayer) for m in pipe.unet.modules())
        folded = generate(pipe)
        assert (folded - stacked).abs().max() < 1e-4
        r1 = pipe.unlearning_ledger.ids()[0]
        with pipe.audit(r1):  # audit works on folded pipelines too
            assert not torch.equal(generate(pipe), folded)
        assert torch.equal(generate(pipe), folded)  # re-folded from the same base and artifacts by the same code
    finally:
        pipe.unfold()
    assert torch.equal(generate(pipe), stacked)  # the same stacked adapter as before folding: the same computation


def test_combined_deltas_sum_sequential_requests_and_none_without_requests(two_requests):
    pipe = two_requests
    artifacts = [pipe.request_adapter(i) for i in pipe.unlearning_ledger.ids()]
    total = combined_deltas(artifacts, "sequential")
    for layer in artifacts[0].layers:
        # atol=0: combined_deltas adds the two deltas in this order, one float32 addition, as the expression does
        torch.testing.assert_close(total[layer], artifacts[0].delta(layer) + artifacts[1].delta(layer), rtol=0, atol=0)
    assert combined_deltas([], "sequential") is None
