"""Hostile or broken inputs, one test per case of the safety review: each is refused with the package's own error
naming what is wrong, and nothing changes (no file outside the target folder, the pipeline and ledger as before)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, kv_state
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import diffusers_unlearn as du
from diffusers_unlearn._validation import check_int, check_number, check_repo_id, check_seed
from diffusers_unlearn.engine.ledger import LedgerError, read_ledger_dir
from diffusers_unlearn.plan import PlanError, load_plan, parse_plan

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pipeline with one request and its saved ledger folder (tests copy the folder before changing it)."""
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    folder = tmp_path_factory.mktemp("saved") / "ledger"
    pipe.save_unlearning(folder)
    return pipe, folder


def _copy(folder: Path, tmp_path: Path) -> tuple[Path, dict]:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target, json.loads((target / "ledger.json").read_text())


def _write(folder: Path, data: dict) -> None:
    (folder / "ledger.json").write_text(json.dumps(data))


def _refused(folder: Path, match: str) -> None:
    """load_unlearning refuses with LedgerError matching ``match``; a fresh pipeline is unchanged."""
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    before = kv_state(fresh)
    with pytest.raises(LedgerError, match=match):
        fresh.load_unlearning(folder)
    after = kv_state(fresh)
    assert fresh.unlearning_ledger.ids() == [] and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in after)


# ------------------------------------------------------------------------------------- paths from a ledger
@pytest.mark.parametrize("request_id", ["../../../../../tmp/x", "/tmp/x", "r0001/../../x", "r1", "x0001", "r0001\n"])
def test_a_request_id_that_is_not_the_library_s_form_is_refused(saved, tmp_path, request_id):
    pipe, folder = saved
    target, data = _copy(folder, tmp_path)
    data["requests"][0]["request_id"] = request_id
    _write(target, data)
    _refused(target, r"requests\[0\]\.request_id must be a request id like 'r0001'")


def test_a_path_in_a_request_id_never_writes_outside_the_folder(saved, tmp_path):
    """The reported attack: load a ledger whose id is a path, then save it elsewhere."""
    pipe, folder = saved
    target, data = _copy(folder, tmp_path)
    outside = tmp_path / "outside"
    data["requests"][0]["request_id"] = f"../../../../../{outside}/x"
    _write(target, data)
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    with pytest.raises(LedgerError):
        fresh.load_unlearning(target)
    fresh.save_unlearning(tmp_path / "out" / "ledger")
    assert not outside.exists() and not list(tmp_path.glob("**/x.safetensors"))


@pytest.mark.parametrize("file", ["../r0001.safetensors", "/etc/passwd", "adapters/../../r0001.safetensors",
                                  "adapters/r0002.safetensors", "adapters/r0001.pt", "adapters\\r0001.safetensors",
                                  "adapters/r0001-XYZ.safetensors"])
def test_an_adapter_file_name_that_is_not_the_library_s_form_is_refused(saved, tmp_path, file):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    data["requests"][0]["adapter"]["file"] = file
    _write(target, data)
    _refused(target, r"requests\[0\]\.adapter\.file")


def test_saving_through_a_planted_symbolic_link_is_refused(saved, tmp_path):
    pipe, _ = saved
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "adapters").symlink_to(outside)
    with pytest.raises(LedgerError, match="symbolic link"):
        pipe.save_unlearning(target)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- malformed fields, field paths
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["requests"][0]["adapter"].pop("sha256"), r"requests\[0\]\.adapter is missing field\(s\) \['sha256'\]"),
        (lambda d: d["requests"][0]["adapter"].update(sha256=None), r"requests\[0\]\.adapter\.sha256 must be a sha256"),
        (lambda d: d["requests"][0].update(strategy={"strategy": "bogus"}), r"requests\[0\]\.strategy is invalid: unknown strategy 'bogus'"),
        (lambda d: d["requests"][0].update(strategy={"strategy": "merge", "bogus": 1}), r"requests\[0\]\.strategy is invalid: unknown merge setting"),
        (lambda d: d["requests"][0].update(adapter="x"), r"requests\[0\]\.adapter must be a map, got 'x'"),
        (lambda d: d["requests"][0].update(seed="0"), r"requests\[0\]\.seed must be an integer >= 0"),
        (lambda d: d["requests"][0].update(prompts="a cat"), r"requests\[0\]\.prompts must be a non-empty list"),
        (lambda d: d["requests"][0].pop("timing"), r"requests\[0\] is missing field\(s\) \['timing'\]"),
        (lambda d: d["requests"][0].update(surprise=1), r"requests\[0\] has unknown field\(s\) \['surprise'\]"),
        (lambda d: d.update(next_index="2"), r"next_index must be an integer >= 1"),
        (lambda d: d.update(next_index=1), r"not increasing and below next_index"),
        (lambda d: d.update(requests={}), r"requests must be a list"),
        (lambda d: d["requests"].append(d["requests"][0]), r"duplicate request ids"),
        (lambda d: d["requests"][0].update(index=2), r"request_id 'r0001' does not match its index 2"),
        (lambda d: d["requests"][0].update(base_fingerprint="kv-other"), r"requests\[0\]\.base_fingerprint"),
    ],
)
def test_every_malformed_ledger_field_is_a_ledger_error_naming_its_path(saved, tmp_path, edit, match):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    edit(data)
    _write(target, data)
    _refused(target, match)


@pytest.mark.parametrize("text", ['"final_loss": NaN', '"final_loss": Infinity', '"final_loss": 1e400'])
def test_non_finite_numbers_in_a_ledger_are_refused(saved, tmp_path, text):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    raw = json.dumps(data)
    key = f'"final_loss": {json.dumps(data["requests"][0]["final_loss"])}'
    assert key in raw
    (target / "ledger.json").write_text(raw.replace(key, text))
    _refused(target, "not valid JSON as this library writes it")


def _rewrite_adapter(folder: Path, data: dict, change) -> None:
    """Replace request 0's adapter tensors by ``change(tensors)``, with the checksum in the ledger updated."""
    path = folder / data["requests"][0]["adapter"]["file"]
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    tensors = change(st_load(raw))
    new = st_save(tensors, metadata=header["__metadata__"])
    path.write_bytes(new)
    data["requests"][0]["adapter"]["sha256"] = hashlib.sha256(new).hexdigest()
    _write(folder, data)


@pytest.mark.parametrize("value", NON_FINITE)
def test_an_adapter_with_non_finite_values_and_a_matching_checksum_is_refused(saved, tmp_path, value):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    _rewrite_adapter(target, data, lambda t: {k: torch.full_like(v, value) for k, v in t.items()})
    _refused(target, "holds non-finite values")


def test_an_adapter_of_the_wrong_shape_is_a_ledger_error_not_a_torch_error(saved, tmp_path):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    key = next(k for k in st_load((target / data["requests"][0]["adapter"]["file"]).read_bytes()) if k.endswith("lora_A"))
    _rewrite_adapter(target, data, lambda t: {**t, key: torch.zeros(t[key].shape[0] + 1, t[key].shape[1])})
    _refused(target, "LoRA factors that do not fit together")
    target2, data2 = _copy(folder, tmp_path / "two")
    _rewrite_adapter(target2, data2, lambda t: {**t, key: torch.zeros(t[key].shape[0], t[key].shape[1] + 3)})
    _refused(target2, r"has shape \(\d+, \d+\), the UNet has")


def test_non_finite_adapters_are_refused_at_fold_time_and_the_unet_is_unchanged(tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    before = kv_state(pipe)
    artifact = pipe.request_adapter("r0001")
    key = next(iter(artifact.tensors))
    artifact.tensors[key][0, 0] = float("nan")  # as if memory were corrupted after loading
    for action in (pipe.fold, pipe.unfold):
        with pytest.raises(FloatingPointError, match="non-finite values"):
            action()
        after = kv_state(pipe)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


# --------------------------------------------------------------------------------- non-finite everywhere
@pytest.mark.parametrize(
    "build",
    [
        lambda v: du.TrainingConfig(learning_rate=v),
        lambda v: du.TrainingConfig(max_grad_norm=v),
        lambda v: du.TrainingConfig(lora_alpha=v),
        lambda v: du.L2Drift(weight=v),
        lambda v: du.L1Drift(weight=v),
        lambda v: du.ESDConfig(negative_guidance=v),
        lambda v: du.ESDConfig(guidance_scale=v),
        lambda v: du.CAConfig(anchor="a dog", guidance_scale=v),
        lambda v: du.SelectiveFinetune(top_k=v),
        lambda v: du.GradientProjection(threshold=v),
        lambda v: du.GradientProjection(dedup_cosine=v),
        lambda v: du.MergeStrategy("ties", scale=v),
        lambda v: du.MergeStrategy("ties", density=v),
    ],
)
@pytest.mark.parametrize("value", [*NON_FINITE, 10**400])
def test_configs_and_regularizers_refuse_non_finite_numbers(build, value):
    with pytest.raises(ValueError, match=r"not a finite number|must be"):
        build(value)


def test_the_validation_helper_names_the_value_and_the_range():
    assert check_int(3, "steps", minimum=1) == 3 and check_number(0.5, "x", minimum=0, maximum=1) == 0.5
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got True"):
        check_int(True, "steps", minimum=1)
    with pytest.raises(ValueError, match=r"top_k must be in \(0, 1\], got nan \(not a finite number\)"):
        check_number(math.nan, "top_k", minimum=0, maximum=1, exclusive_minimum=True)
    with pytest.raises(ValueError, match=r"lr must be a number > 0, got '1e-4'"):
        check_number("1e-4", "lr", minimum=0, exclusive_minimum=True)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 \(at most 2\*\*63 - 1\)"):
        check_seed(2**64)
    assert check_repo_id("user/model") == "user/model"
    with pytest.raises(ValueError, match="invalid repo_id 'a/../b'"):
        check_repo_id("a/../b")


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e400", "1.0e+400"])
def test_a_plan_with_a_non_finite_number_is_refused(tmp_path, text):
    plan = tmp_path / "PLAN.yaml"
    plan.write_text(f"model: tiny\noutput: out\nrequests:\n  - concept: cat\n    learning_rate: {text}\n")
    with pytest.raises(PlanError, match=r"request 1 \('cat'\): learning_rate must be a number > 0, got -?inf|nan"):
        load_plan(plan)
    regularizer = tmp_path / "REG.yaml"
    regularizer.write_text(f"model: tiny\noutput: out\nrequests:\n  - concept: cat\n    regularizers:\n"
                           f"      - {{name: l2_drift, weight: {text}}}\n")
    with pytest.raises(PlanError, match="weight must be a number >= 0"):
        load_plan(regularizer)


@pytest.mark.parametrize("text", ["{concept: cat, concept: dog}", "{concept: cat, steps: 2, steps: 3}"])
def test_a_plan_with_a_duplicated_key_is_refused(tmp_path, text):
    plan = tmp_path / "PLAN.yaml"
    plan.write_text(f"model: tiny\noutput: out\nrequests:\n  - {text}\n")
    with pytest.raises(PlanError, match="found duplicate key"):
        load_plan(plan)
    top = tmp_path / "TOP.yaml"
    top.write_text("model: tiny\noutput: out\noutput: elsewhere\nrequests: [{concept: cat}]\n")
    with pytest.raises(PlanError, match="found duplicate key 'output'"):
        load_plan(top)


@pytest.mark.parametrize("argv", [["--learning-rate", "nan"], ["--l2", "inf"], ["--top-k", "1e400"]])
def test_the_cli_refuses_non_finite_numbers(argv, capsys):
    from diffusers_unlearn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "tiny", "--concept", "cat", *argv])
    assert exit_info.value.code == 2 and f"expected a finite number, got {argv[1]!r}" in capsys.readouterr().err


def test_templates_with_a_named_field_are_a_clear_error(pipe):
    for templates in (["{} {x}"], ["{0} and {}"], ["{}}"], ["{!r}"]):
        with pytest.raises(ValueError, match="exactly one '{}' slot and no other fields"):
            pipe.unlearn("cat", templates=templates, **FAST)
    with pytest.raises(PlanError, match="no other fields"):
        parse_plan({"model": "tiny", "output": "o", "requests": [{"concept": "cat", "templates": ["{} {x}"]}]})


# ------------------------------------------------------------------------------- non-finite during training
class _Poison(du.Regularizer):
    """Makes the loss or the gradients non-finite at one step."""

    name = "poison_for_test"

    def __init__(self, at_step: int, where: str):
        self.at_step, self.where = at_step, where

    def to_dict(self):
        return {"name": self.name}

    def loss(self, ctx):
        if self.where == "loss" and ctx.step == self.at_step:
            return torch.tensor(float("nan"))
        return None

    def transform_gradients(self, ctx):
        if self.where == "gradients" and ctx.step == self.at_step:
            ctx.adapter.parameters[0].grad[0, 0] = float("inf")


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_a_training_step_that_turns_non_finite_stops_the_request_and_changes_nothing(saved, tmp_path, where):
    _, folder = saved
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.load_unlearning(folder)
    before, ids = kv_state(pipe), pipe.unlearning_ledger.ids()
    ledger_bytes = (folder / "ledger.json").read_bytes()
    with pytest.raises(FloatingPointError, match=rf"unlearning 'dog': the {where if where == 'loss' else 'gradients'}"
                                                 r".* at step 3; the request was stopped"):
        pipe.unlearn("dog", domain="object", seed=1, regularizers=[_Poison(2, where)], **FAST)
    assert pipe.unlearning_ledger.ids() == ids and pipe.unlearning_ledger.next_index == 2
    after = kv_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert (folder / "ledger.json").read_bytes() == ledger_bytes
