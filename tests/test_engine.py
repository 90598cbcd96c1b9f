"""Core engine: tiny pipeline, objectives, adapters, ledger, audit/rollback/fold, errors that change nothing."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import FAST, PROMPT, generate, kv_state

import diffusers_unlearn as du
from diffusers_unlearn import adapters as ad
from diffusers_unlearn.conditioning import TextConditioner, sample_trajectory


def test_tiny_pipeline_is_real_deterministic_and_offline():
    a, b, c = du.testing.tiny_pipeline(0), du.testing.tiny_pipeline(0), du.testing.tiny_pipeline(1)
    assert type(a).__name__ == "StableDiffusionPipeline"
    assert len(ad.kv_module_names(a.unet)) == 14
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert torch.equal(generate(a), generate(b))
    assert generate(a).shape == (1, 3, 16, 16)


def test_attach_keeps_class_name_and_is_idempotent(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert isinstance(pipe, du.UnlearnMixin)
    assert du.attach(pipe) is pipe
    assert pipe.removed_concepts == []


def _esd_probe(pipe, prompts, seed=5):
    """Frozen-trajectory latents of ``prompts`` and the ESD target on them (eta = 1), from the current model."""
    cond = TextConditioner(pipe)
    latents, timesteps = sample_trajectory(
        cond, pipe.unet, cond.encode(prompts), cond.encode_unconditional(len(prompts)),
        steps=8, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed),
    )
    x = latents[[2, 4, 6]].flatten(0, 1)
    t = timesteps[[2, 4, 6]].repeat_interleave(len(prompts))

    def predict(p, texts):
        c = TextConditioner(p)
        with torch.no_grad():
            return c.predict_noise(p.unet, x, t, c.encode(texts * 3))

    empty = predict(pipe, [""] * len(prompts))
    concept = predict(pipe, prompts)
    return predict, empty - (concept - empty), concept


def test_esd_moves_the_concept_prediction_toward_the_esd_target(pipe):
    prompts = ["an image in van gogh style", "a painting in van gogh style"]
    predict, target, before = _esd_probe(pipe, prompts)
    pipe.unlearn("van gogh", domain="style", steps=40, sampling_steps=8, learning_rate=3e-3, seed=0)
    after = predict(pipe, prompts)
    before_gap, after_gap = (before - target).norm(), (after - target).norm()
    assert after_gap < 0.8 * before_gap, (before_gap, after_gap)


def test_ca_moves_the_target_prediction_toward_the_anchor(pipe):
    predict, _, _ = _esd_probe(pipe, ["a photo of a cat"])
    anchor_before = predict(pipe, ["a photo of a dog"])
    target_before = predict(pipe, ["a photo of a cat"])
    record = pipe.unlearn("cat", method="ca", anchor="dog", domain="object", steps=40, sampling_steps=8,
                          learning_rate=3e-3, seed=0)
    target_after = predict(pipe, ["a photo of a cat"])
    assert (target_after - anchor_before).norm() < 0.8 * (target_before - anchor_before).norm()
    assert record.method == "ca" and record.method_config["anchor"] == "dog"


@dataclass
class Probe(du.Regularizer):
    """Checks, at every step, what is trainable and what the frozen start model is."""

    name: ClassVar[str] = "probe"
    seen: list = None

    def setup(self, ctx):
        self.seen = []
        self.adapter_params = {id(p) for p in ctx.adapter.parameters}

    def after_step(self, ctx):
        trainable = [n for n, p in ctx.unet.named_parameters() if p.requires_grad]
        self.seen.append((trainable, {id(p) for p in ctx.unet.parameters() if p.requires_grad} == self.adapter_params))


def test_only_the_new_adapter_trains_and_earlier_ones_stay_bit_identical(pipe):
    first = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    stored_first = {k: v.clone() for k, v in pipe.request_adapter(first.request_id).tensors.items()}
    installed_first = kv_state(pipe)
    probe = Probe()
    pipe.unlearn("dog", domain="object", seed=1, regularizers=[probe], **FAST)
    assert len(probe.seen) == FAST["steps"]
    for trainable, only_adapter in probe.seen:
        assert only_adapter
        assert trainable and all("unlearn_training" in n for n in trainable)
    for key, value in pipe.request_adapter(first.request_id).tensors.items():
        assert torch.equal(value, stored_first[key]), key
    now = kv_state(pipe)
    for name, value in installed_first.items():  # the base weights; request 1's factors lead the stack
        current = now[name]
        if "lora_A" in name:
            current = current[: value.shape[0]]
        elif "lora_B" in name:
            current = current[:, : value.shape[1]]
        assert torch.equal(current, value), name
    assert pipe.unet.active_adapters() == ["unlearn_stack"]
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_training_starts_from_earlier_requests_folded(pipe):
    first = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    delta = pipe.request_adapter(first.request_id).delta
    expected = {n: w + delta(n) for n, w in pipe._unlearning().base_weights.items()}

    @dataclass
    class StartCheck(du.Regularizer):
        name: ClassVar[str] = "start_check"

        def setup(self, ctx):
            for n, w in expected.items():
                torch.testing.assert_close(ad.kv_linear(ctx.unet, n).weight, w, rtol=0, atol=1e-6)
            assert ctx.start_offsets is not None

    pipe.unlearn("dog", domain="object", seed=1, regularizers=[StartCheck()], **FAST)


def _with_adapters(pipe, request_ids):
    """The reference for "turning adapters off": a fresh pipeline of the same base with only ``request_ids``'
    artifacts put in as separate peft adapters, by hand."""
    reference = du.testing.tiny_pipeline(seed=0)
    names = [f"manual_{i}" for i in request_ids]
    for name, request_id in zip(names, request_ids):
        ad.install(reference.unet, name, pipe.request_adapter(request_id))
    ad.activate(reference.unet, names)
    return generate(reference)


def test_audit_and_rollback_equal_turning_that_adapter_off(two_requests):
    pipe = two_requests
    r1, r2 = pipe.unlearning_ledger.ids()
    stacked = generate(pipe)
    only_r1, without_r1 = _with_adapters(pipe, [r1]), _with_adapters(pipe, [r2])
    assert (_with_adapters(pipe, [r1, r2]) - stacked).abs().max() < 1e-5  # one stacked adapter == separate ones
    assert not torch.equal(without_r1, stacked)

    with pipe.audit(r1) as audited:
        assert audited is pipe
        assert torch.equal(generate(pipe), only_r1)
    with pipe.audit(r1, mode="without"):
        assert torch.equal(generate(pipe), without_r1)
    assert torch.equal(generate(pipe), stacked)

    with pytest.raises(RuntimeError, match="boom"):
        with pipe.audit(r2):
            raise RuntimeError("boom")
    assert torch.equal(generate(pipe), stacked)


def test_stacked_requests_share_one_adapter_branch(two_requests):
    pipe = two_requests
    assert pipe.unet.active_adapters() == ["unlearn_stack"]
    layer = pipe.unet.get_submodule(ad.kv_module_names(pipe.unet)[0])
    ranks = [pipe.request_adapter(i).tensors[f"{ad.kv_module_names(pipe.unet)[0]}.lora_A"].shape[0]
             for i in pipe.unlearning_ledger.ids()]
    assert layer.lora_A["unlearn_stack"].weight.shape[0] == sum(ranks)


def test_rollback_drops_one_request_and_keeps_the_rest():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    r1 = pipe.unlearn("van gogh", domain="style", seed=0, **FAST).request_id
    r2 = pipe.unlearn("dog", domain="object", seed=1, **FAST).request_id
    with pipe.audit(r1, mode="without"):
        without_r1 = generate(pipe)
    dropped = pipe.rollback(r1)
    assert dropped.concept == "van gogh"
    assert pipe.removed_concepts == ["dog"] and pipe.unlearning_ledger.ids() == [r2]
    assert torch.equal(generate(pipe), without_r1)
    assert pipe.unlearning_ledger.history[-1]["event"] == "rollback"
    r3 = pipe.unlearn("cat", domain="object", seed=2, **FAST).request_id
    assert r3 == "r0003"  # ids are never reused


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
        assert torch.equal(generate(pipe), folded)
    finally:
        pipe.unfold()
    assert torch.equal(generate(pipe), stacked)


def test_save_then_load_in_a_fresh_process_gives_identical_images(two_requests, tmp_path):
    pipe = two_requests
    pipe.save_unlearning(tmp_path / "out")
    expected = generate(pipe)
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch
torch.set_num_threads(1)
import diffusers_unlearn as du
pipe = du.attach(du.testing.tiny_pipeline(seed=0))
ids = pipe.load_unlearning({str(tmp_path / 'out')!r})
images = pipe({PROMPT!r}, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert ids == ["r0001", "r0002"], ids
assert pipe.removed_concepts == ["van gogh", "dog"], pipe.removed_concepts
assert torch.equal(images, expected), (images - expected).abs().max()
print("IDENTICAL")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IDENTICAL" in result.stdout


def test_ledger_records_what_the_request_was(two_requests, tmp_path):
    pipe = two_requests
    record = pipe.unlearning_ledger.requests[0]
    assert (record.request_id, record.concept, record.domain, record.method) == ("r0001", "van gogh", "style", "esd")
    assert record.steps == FAST["steps"] and record.seed == 0 and record.seconds > 0
    assert record.base_fingerprint == pipe.base_fingerprint and record.library_version == du.__version__
    assert record.method_config["negative_guidance"] == 1.0 and record.method_config["sampling_steps"] == 4
    assert record.prompts == [t.format("van gogh") for t in du.TEMPLATES["style"]]
    assert record.final_loss == record.final_loss  # not NaN
    pipe.save_unlearning(tmp_path)
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert [r["concept"] for r in data["requests"]] == ["van gogh", "dog"]
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert [re.sub(r"-[0-9a-f]{16}\.", ".", n) for n in names] == ["r0001.safetensors", "r0002.safetensors"]
    assert [f"adapters/{n}" for n in names] == [r["adapter"]["file"] for r in data["requests"]]
    assert not list(tmp_path.rglob("*.tmp"))


def test_full_rank_lora_and_rank_in_ledger(pipe):
    record = pipe.unlearn("van gogh", domain="style", rank="full", seed=0, **FAST)
    artifact = pipe.request_adapter(record.request_id)
    for layer in artifact.layers:
        a = artifact.tensors[f"{layer}.lora_A"]
        assert a.shape[0] == min(artifact.delta(layer).shape)
    assert record.adapter["kind"] == "lora" and record.training["rank"] == "full"


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(concept=""), ValueError, "non-empty"),
        (dict(concept="   "), ValueError, "non-empty"),
        (dict(concept=3), TypeError, "must be a string"),
        (dict(concept=None), TypeError, "must be a string"),
        (dict(concept="cat", method="nope"), ValueError, "unknown method 'nope'.*esd"),
        (dict(concept="cat", steps=0), ValueError, "steps must be an integer >= 1, got 0"),
        (dict(concept="cat", steps=2.5), ValueError, "steps must be an integer"),
        (dict(concept="cat", rank=0), ValueError, "rank must be an integer >= 1, got 0"),
        (dict(concept="cat", rank="half"), ValueError, "rank"),
        (dict(concept="cat", learning_rate=-1.0), ValueError, "learning_rate"),
        (dict(concept="cat", domain="painting"), ValueError, "unknown domain 'painting'"),
        (dict(concept="cat", method="ca"), ValueError, "needs an anchor"),
        (dict(concept="cat", bogus=1), TypeError, "no option.*bogus"),
        (dict(concept="cat", seed=-1), ValueError, "seed"),
        (dict(concept="cat", strategy="zigzag"), ValueError, "unknown strategy"),
        (dict(concept="cat", regularizers=["l2"]), TypeError, "regularizers must be"),
    ],
)
def test_bad_unlearn_input_is_refused_and_changes_nothing(two_requests, kwargs, error, match):
    pipe = two_requests
    before_images, before_state = generate(pipe), kv_state(pipe)
    before_ids = pipe.unlearning_ledger.ids()
    with pytest.raises(error, match=match):
        pipe.unlearn(**kwargs)
    assert pipe.unlearning_ledger.ids() == before_ids
    after = kv_state(pipe)
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], before_state[k]) for k in after)
    assert torch.equal(generate(pipe), before_images)


def test_unknown_request_ids_are_refused(two_requests):
    pipe = two_requests
    for call in (lambda: pipe.rollback("r0099"), lambda: pipe.audit("r0099").__enter__(), lambda: pipe.rollback(1)):
        with pytest.raises(du.UnknownRequestError, match="no request .* known request ids: \\['r0001', 'r0002'\\]"):
            call()
    with pytest.raises(ValueError, match="audit mode"):
        pipe.audit("r0001", mode="sideways").__enter__()
    assert pipe.unlearning_ledger.ids() == ["r0001", "r0002"]


def _saved(two_requests, tmp_path):
    two_requests.save_unlearning(tmp_path / "saved")
    return tmp_path / "saved"


def test_bad_ledger_directories_are_refused_and_change_nothing(two_requests, tmp_path):
    saved = _saved(two_requests, tmp_path)
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    before = generate(fresh)

    with pytest.raises(du.LedgerError, match="does not exist"):
        fresh.load_unlearning(tmp_path / "missing")

    corrupted = tmp_path / "corrupted"
    corrupted.mkdir()
    (corrupted / "ledger.json").write_text("{not json")
    with pytest.raises(du.LedgerError, match="corrupted"):
        fresh.load_unlearning(corrupted)

    (corrupted / "ledger.json").write_text(json.dumps({"format": 1, "requests": [{"concept": "x"}]}))
    with pytest.raises(du.LedgerError, match="corrupted|missing field"):
        fresh.load_unlearning(corrupted)

    not_safetensors = tmp_path / "not_safetensors"
    subprocess.run(["cp", "-r", str(saved), str(not_safetensors)], check=True)
    data = json.loads((not_safetensors / "ledger.json").read_text())
    garbage = b"this is not a safetensors file at all"
    (not_safetensors / data["requests"][1]["adapter"]["file"]).write_bytes(garbage)
    # a matching checksum: the format check itself must catch it
    data["requests"][1]["adapter"]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (not_safetensors / "ledger.json").write_text(json.dumps(data))
    with pytest.raises(du.LedgerError, match="r0002-[0-9a-f]{16}.safetensors is not a valid safetensors file"):
        fresh.load_unlearning(not_safetensors)

    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(saved), str(tampered)], check=True)
    first = tampered / json.loads((tampered / "ledger.json").read_text())["requests"][0]["adapter"]["file"]
    raw = bytearray(first.read_bytes())
    raw[-5] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(du.LedgerError, match="r0001-[0-9a-f]{16}.safetensors does not match the checksum"):
        fresh.load_unlearning(tampered)

    other_base = du.attach(du.testing.tiny_pipeline(seed=1))
    with pytest.raises(du.LedgerError) as info:
        other_base.load_unlearning(saved)
    assert two_requests.base_fingerprint in str(info.value) and other_base.base_fingerprint in str(info.value)

    assert fresh.removed_concepts == [] and other_base.removed_concepts == []
    assert torch.equal(generate(fresh), before)
    fresh.load_unlearning(saved)  # the good directory still loads afterwards
    assert fresh.removed_concepts == ["van gogh", "dog"]
    with pytest.raises(ValueError, match="already holds requests"):
        fresh.load_unlearning(saved)
    assert fresh.load_unlearning(saved, replace=True) == ["r0001", "r0002"]


class Interrupt(du.Regularizer):
    name: ClassVar[str] = "interrupt"

    def __init__(self, at_step: int, error: BaseException):
        self.at_step, self.error = at_step, error

    def to_dict(self):
        return {"name": self.name}

    def after_step(self, ctx):
        if ctx.step == self.at_step:
            raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_interrupted_request_leaves_pipeline_ledger_and_adapters_as_they_were(error, tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    pipe.save_unlearning(tmp_path)
    ledger_bytes = (tmp_path / "ledger.json").read_bytes()
    adapter_file = tmp_path / pipe.unlearning_ledger.requests[0].adapter["file"]
    adapter_bytes = adapter_file.read_bytes()
    before_images, before_state = generate(pipe), kv_state(pipe)

    with pytest.raises(type(error)):
        pipe.unlearn("dog", domain="object", seed=1, regularizers=[Interrupt(3, error)], **FAST)

    assert pipe.unlearning_ledger.ids() == ["r0001"] and pipe.unlearning_ledger.next_index == 2
    after = kv_state(pipe)
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], before_state[k]) for k in after)
    assert torch.equal(generate(pipe), before_images)
    assert (tmp_path / "ledger.json").read_bytes() == ledger_bytes
    assert adapter_file.read_bytes() == adapter_bytes
    assert pipe.unet.active_adapters() == ["unlearn_stack"]
    # and the pipeline still works afterwards
    assert pipe.unlearn("dog", domain="object", seed=1, **FAST).request_id == "r0002"


def test_attach_refuses_a_pipeline_without_cross_attention():
    class NoUnet:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="supported: Stable Diffusion 1.x/2.x and SDXL"):
        du.attach(NoUnet())


def test_esd_on_a_trained_model_moves_the_target_and_barely_an_unrelated_concept():
    """On MiniCanvas (trained, so its conditioning means something): ESD on "neon lines" brings that style's
    prediction closer to the ESD target and moves its conditional signal a lot; an unrelated style and object
    ("ink wash" tower, on its own trajectory) moves far less."""
    from diffusers_unlearn import minicanvas as mc

    pipe = du.attach(mc.load_pipeline())
    cond = TextConditioner(pipe)
    target_prompt, unrelated_prompt = mc.prompt("neon lines", "cat"), mc.prompt("ink wash", "tower")

    def probe(prompt):
        latents, timesteps = sample_trajectory(
            cond, pipe.unet, cond.encode([prompt] * 2), cond.encode_unconditional(2), steps=8,
            guidance_scale=mc.GUIDANCE_SCALE, generator=torch.Generator().manual_seed(3),
        )
        return latents[[2, 4, 6]].flatten(0, 1), timesteps[[2, 4, 6]].repeat_interleave(2)

    def predict(x, t, prompt=None):
        c = cond.encode_unconditional(len(x)) if prompt is None else cond.encode([prompt] * len(x))
        with torch.no_grad():
            return cond.predict_noise(pipe.unet, x, t, c)

    xa, ta = probe(target_prompt)
    xb, tb = probe(unrelated_prompt)
    a0, ua = predict(xa, ta, target_prompt), predict(xa, ta)
    b0, ub = predict(xb, tb, unrelated_prompt), predict(xb, tb)
    esd_target = ua - (a0 - ua)  # negative guidance 1, frozen model

    pipe.unlearn("neon lines", domain="style", templates=[f"a {o} in {{}} style" for o in mc.OBJECTS], steps=30,
                 learning_rate=3e-3, sampling_steps=10, num_trajectories=6, seed=0)
    a1, b1 = predict(xa, ta, target_prompt), predict(xb, tb, unrelated_prompt)
    assert (a1 - esd_target).norm() < 0.95 * (a0 - esd_target).norm()
    moved_target = (a1 - a0).norm() / (a0 - ua).norm()  # relative to each prompt's own conditional signal
    moved_unrelated = (b1 - b0).norm() / (b0 - ub).norm()
    assert moved_target > 0.3, float(moved_target)
    assert moved_unrelated < 0.25 * moved_target, (float(moved_unrelated), float(moved_target))
