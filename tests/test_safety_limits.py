"""Issue 28: bounds on every ledger field (checked at load and at save), files checked from their size and header
before they are read, a folder lock that cannot leak, one thread per pipeline, readers and save_unlearned agreeing on
one lock, stale temporaries removed, and clear errors where foreign ones escaped."""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import FAST, kv_state
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_safety import _copy, saved  # noqa: F401 (saved: the module fixture of one saved request)

import diffusers_unlearn as du
from diffusers_unlearn import _atomic
from diffusers_unlearn.publishing import export
from diffusers_unlearn.engine import ledger as ledger_module
from diffusers_unlearn.engine.ledger import INDEX_MAX, LEDGER_MAX_BYTES, Ledger, LedgerError, read_ledger_dir, write_ledger_dir
from diffusers_unlearn.plan import PlanError, load_plan, run_plan
from diffusers_unlearn.engine.state import PipelineBusyError


def _refused(folder: Path, match: str) -> None:
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    before = kv_state(fresh)
    with pytest.raises(LedgerError, match=match) as info:
        fresh.load_unlearning(folder)
    assert str(folder) in str(info.value)  # the error names the file
    assert fresh.unlearning_ledger.ids() == [] and all(torch.equal(kv_state(fresh)[k], v) for k, v in before.items())


def _rewrite_adapter(folder: Path, data: dict, tensors=None, metadata=None) -> None:
    path = folder / data["requests"][0]["adapter"]["file"]
    raw = path.read_bytes()
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    new = st_save(tensors(st_load(raw)) if tensors else st_load(raw),
                  metadata=metadata(header["__metadata__"]) if metadata else header["__metadata__"])
    path.write_bytes(new)
    data["requests"][0]["adapter"]["sha256"] = hashlib.sha256(new).hexdigest()
    (folder / "ledger.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ one schema, bounds
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(next_index=INDEX_MAX + 2), r"next_index must be an integer >= 1 \(at most 1000000000\)"),
        (lambda d: d["requests"][0].update(seed=2**70), r"requests\[0\]\.seed must be an integer >= 0 \(at most 2\*\*63"),
        (lambda d: d["requests"][0].update(steps=10**12), r"requests\[0\]\.steps must be an integer >= 0 \(at most"),
        (lambda d: d["requests"][0].update(seconds=1e300), r"requests\[0\]\.seconds must be a number >= 0"),
        (lambda d: d["requests"][0]["adapter"].update(ranks=[0]), r"requests\[0\]\.adapter\.ranks must be a list of integers in \[1, 65536\]"),
        (lambda d: d["requests"][0]["adapter"].update(kind="dense"), r"requests\[0\]\.adapter\.kind is 'dense' but the file holds a 'lora'"),
        (lambda d: d["requests"][0]["adapter"].update(ranks=[3]), r"requests\[0\]\.adapter\.ranks is \[3\] but the file's LoRA ranks are"),
        (lambda d: d["requests"][0]["adapter"].update(targets=["attn1.to_q"]), r"requests\[0\]\.adapter\.targets \['attn1.to_q'\] do not match"),
        (lambda d: d["requests"][0].update(method="bogus"), r"requests\[0\]\.method 'bogus' is not a registered method"),
        (lambda d: d["requests"][0]["method_config"].update(junk=1), r"requests\[0\]\.method_config is not a valid 'esd' configuration: .*junk"),
        (lambda d: d["requests"][0]["method_config"].update(sampling_steps="many"), r"requests\[0\]\.method_config is not a valid 'esd' configuration: sampling_steps"),
        (lambda d: d["requests"][0]["method_config"].update(method="ca"), r"requests\[0\]\.method_config\.method must be the record's method 'esd'"),
        (lambda d: d["requests"][0]["regularizers"].append({"name": "bogus"}), r"requests\[0\]\.regularizers\[0\] is not a valid regularizer: unknown regularizer 'bogus'"),
        (lambda d: d["requests"][0]["regularizers"].append({"name": "l2_drift", "weight": "x"}), r"requests\[0\]\.regularizers\[0\] is not a valid regularizer"),
        (lambda d: d["requests"][0]["regularizers"].append({"name": "l2_drift", "junk": 1}), r"regularizers\[0\] is not a valid regularizer: .*junk"),
    ],
)
def test_every_ledger_field_is_bounded_and_checked_against_its_file_and_registry(saved, tmp_path, edit, match):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    edit(data)
    (target / "ledger.json").write_text(json.dumps(data))
    _refused(target, match)


def test_duplicate_json_keys_are_refused(saved, tmp_path):
    _, folder = saved
    target, _ = _copy(folder, tmp_path)
    text = (target / "ledger.json").read_text()
    (target / "ledger.json").write_text(text.replace('"next_index": 2,', '"next_index": 2, "next_index": 3,', 1))
    _refused(target, "key 'next_index' appears twice")


def test_a_huge_next_index_cannot_make_a_folder_unreadable(saved, tmp_path):
    """c7ee944: next_index 10**9 loaded, the next request became r1000000000, and the saved folder no longer loaded."""
    pipe, folder = saved
    target, data = _copy(folder, tmp_path)
    data["next_index"] = INDEX_MAX + 1  # the last value a ledger may hold: no request id is left
    (target / "ledger.json").write_text(json.dumps(data))
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    fresh.load_unlearning(target)
    with pytest.raises(LedgerError, match="the ledger is full"):
        fresh.unlearning_ledger.new_request_id()
    fresh.save_unlearning(tmp_path / "again")  # what a load accepts, a save writes, and it loads again
    assert du.attach(du.testing.tiny_pipeline(seed=0)).load_unlearning(tmp_path / "again") == ["r0001"]


@pytest.mark.parametrize("request_id", ["../../x", "r0001\x00", "r" + "1" * 5000, "r1000000000"])
def test_a_save_rechecks_request_ids_before_it_names_any_path(saved, tmp_path, request_id):
    pipe, _ = saved
    record = pipe.unlearning_ledger.requests[0]
    ledger = Ledger(pipe.unlearning_ledger.base_fingerprint, [du.RequestRecord(**{**record.to_dict(),
                                                                                  "request_id": request_id})], 2)
    adapters = {request_id: pipe.request_adapter(record.request_id)}
    with pytest.raises(LedgerError, match=r"request_id must be a request id like 'r0001'"):
        write_ledger_dir(tmp_path / "a" / "b", ledger, adapters)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written, inside or outside


def test_a_save_never_writes_what_a_load_refuses(saved, tmp_path):
    pipe, _ = saved
    record = pipe.unlearning_ledger.requests[0]
    adapters = {record.request_id: pipe.request_adapter(record.request_id)}
    for change, match in [({"seed": 2**70}, "seed must be"), ({"method_config": {"method": "esd", "junk": 1}}, "junk"),
                          ({"evaluation": {"ua": float("nan")}}, "JSON cannot store")]:
        ledger = Ledger(record.base_fingerprint, [du.RequestRecord(**{**record.to_dict(), **change})], 2)
        with pytest.raises(LedgerError, match=match):
            write_ledger_dir(tmp_path / "out", ledger, adapters)
        assert not (tmp_path / "out" / "ledger.json").exists()
    with pytest.raises(LedgerError, match="next_index"):
        write_ledger_dir(tmp_path / "out", Ledger(record.base_fingerprint, [record], 10**12), adapters)


# ---------------------------------------------------------------------------------- sizes before reading
def _no_reading(monkeypatch, path: Path) -> None:
    real = Path.read_bytes

    def read_bytes(self):
        assert Path(self) != path, f"{path} was read whole"
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(ledger_module, "file_sha256", lambda p, *a: pytest.fail(f"{p} was hashed before its header"))


def test_a_huge_adapter_file_is_refused_from_its_header_without_reading_it(saved, tmp_path, monkeypatch):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    path = target / data["requests"][0]["adapter"]["file"]
    header = json.dumps({"x.lora_A": {"dtype": "F32", "shape": [30000, 25000], "data_offsets": [0, 3 * 10**9]}})
    with open(path, "wb") as handle:  # a sparse 3 GB file: no disk space used
        handle.write(len(header).to_bytes(8, "little") + header.encode())
        handle.truncate(8 + len(header) + 3 * 10**9)
    _no_reading(monkeypatch, path)
    _refused(target, r"tensor 'x.lora_A' is not an adapter tensor of one of this model's")


@pytest.mark.parametrize("header, match", [
    (b"\xff" * 8, "header length"),
    (json.dumps({"a": {"dtype": "I64", "shape": [1, 1], "data_offsets": [0, 8]}}).encode(), "dtype 'I64'"),
    (json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}).encode(), "data_offsets"),
    (b'{"a": 1, "a": 2}', "appears twice"),
])
def test_malformed_adapter_headers_are_refused_before_any_tensor_is_read(saved, tmp_path, monkeypatch, header, match):
    _, folder = saved
    target, data = _copy(folder, tmp_path)
    path = target / data["requests"][0]["adapter"]["file"]
    raw = header if header.startswith(b"\xff") else len(header).to_bytes(8, "little") + header + b"\0" * 16
    path.write_bytes(raw)
    _no_reading(monkeypatch, path)
    _refused(target, match)


def test_a_huge_ledger_json_is_refused_before_it_is_read(saved, tmp_path, monkeypatch):
    _, folder = saved
    target, _ = _copy(folder, tmp_path)
    with open(target / "ledger.json", "r+b") as handle:
        handle.truncate(100 * 2**20)  # sparse
    _no_reading(monkeypatch, target / "ledger.json")
    _refused(target, f"more than the {LEDGER_MAX_BYTES} bytes a ledger may have")


def test_rank_zero_factors_and_huge_scales_are_ledger_errors(saved, tmp_path):
    _, folder = saved
    target2, data2 = _copy(folder, tmp_path / "two")

    def huge(meta):
        info = json.loads(meta["diffusers_unlearn"])
        info["scales"] = {k: 1e300 for k in info["scales"]}
        return {"diffusers_unlearn": json.dumps(info, sort_keys=True)}

    _rewrite_adapter(target2, data2, metadata=huge)
    _refused(target2, r"has scale 1e\+300; a scale must be a finite number in \[-1e\+06, 1e\+06\]")
    target3, data3 = _copy(folder, tmp_path / "three")
    _rewrite_adapter(target3, data3, tensors=lambda t: {
        k: (v[:0] if k.endswith("lora_A") else v[:, :0]) for k, v in t.items()})
    data3["requests"][0]["adapter"].pop("ranks")
    (target3 / "ledger.json").write_text(json.dumps(data3))
    _refused(target3, "rank")


# ---------------------------------------------------------------------------------------------- the folder lock
def _is_unlocked(folder: Path) -> bool:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("point", ["open", "flock", "body", "unlock", "close"])
def test_an_interrupt_at_any_point_of_the_lock_leaves_the_folder_unlocked(tmp_path, monkeypatch, point):
    real_flock, real_close, real_open = fcntl.flock, os.close, os.open
    state = {"armed": True}

    def interrupt_if(name):
        if state["armed"] and name == point:
            state["armed"] = False
            raise KeyboardInterrupt(f"injected at {name}")

    def flock(fd, op):
        interrupt_if("unlock" if op == fcntl.LOCK_UN else "flock")
        return real_flock(fd, op)

    def close(fd):
        interrupt_if("close")
        return real_close(fd)

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if Path(path) == tmp_path:
            interrupt_if("open")  # after the descriptor exists: the worst moment
        return fd

    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", flock)
        patch.setattr(os, "close", close)
        patch.setattr(os, "open", open_)
        with pytest.raises(KeyboardInterrupt):
            with _atomic.folder_lock(tmp_path):
                interrupt_if("body")
    if point != "open":  # an interrupt between os.open's return and the assignment cannot be caught in Python
        assert _is_unlocked(tmp_path)
    with _atomic.folder_lock(tmp_path):  # and the next lock in this process does not block
        pass


# ------------------------------------------------------------------------------------- one thread per pipeline
def test_a_pipeline_used_by_another_thread_refuses_with_a_clear_error(saved):
    pipe, _ = saved
    request_id = pipe.unlearning_ledger.ids()[0]
    errors: list[BaseException] = []

    def other():
        for call in (pipe.fold, lambda: pipe.unlearn("dog", domain="object", **FAST),
                     lambda: pipe.save_unlearning("/nonexistent/x"), lambda: pipe.rollback(request_id)):
            try:
                call()
            except BaseException as err:  # noqa: BLE001 - collected for the main thread
                errors.append(err)

    with pipe.audit(request_id):  # this thread uses the pipeline; re-entrant calls of this thread work
        pipe.export_lora(request_id, Path(os.devnull).parent / "tmp" / f"du-{os.getpid()}")
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    assert len(errors) == 4 and all(isinstance(e, PipelineBusyError) for e in errors), errors
    assert "one pipeline is used by one thread at a time" in str(errors[0]).lower()
    assert "audit()" in str(errors[0])
    pipe.fold()  # free again
    pipe.unfold()
    shutil.rmtree(Path(os.devnull).parent / "tmp" / f"du-{os.getpid()}", ignore_errors=True)


def test_two_threads_unlearning_on_one_pipeline_give_one_result_and_one_clear_error():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    started, results = threading.Barrier(2), []

    def run(concept):
        started.wait()
        try:
            results.append(pipe.unlearn(concept, domain="style", seed=0, **FAST).request_id)
        except PipelineBusyError as err:
            results.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in ("van gogh", "monet")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ids = [r for r in results if isinstance(r, str)]
    assert len(results) == 2 and pipe.unlearning_ledger.ids() == sorted(ids) and len(ids) >= 1
    assert all(isinstance(r, (str, PipelineBusyError)) for r in results)


# ------------------------------------------------------------------- readers and save_unlearned, processes
def _reader(target: str, rounds: int, queue) -> None:
    from diffusers_unlearn.engine.saved_folder import read_saved_state

    errors = []
    for _ in range(rounds):
        try:
            with _atomic.sibling_lock(Path(target), shared=True):
                state = read_saved_state(Path(target))
                ledger, _ = read_ledger_dir(Path(target) / "unlearning")
            if ledger.ids() != state["requests"]:
                errors.append(f"mixed folders: {ledger.ids()} vs {state['requests']}")
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors.append(repr(err))
    queue.put(errors)


def test_a_load_during_save_unlearned_sees_the_old_or_the_new_folder(saved, tmp_path):
    pipe, _ = saved
    two = du.attach(du.testing.tiny_pipeline(seed=0))
    two.load_unlearning(saved[1])
    two.unlearn("dog", domain="object", seed=1, **FAST)
    target = tmp_path / "target"
    pipe.save_unlearned(target)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    reader = context.Process(target=_reader, args=(str(target), 60, queue))
    reader.start()
    for i in range(6):
        (two if i % 2 == 0 else pipe).save_unlearned(target)
    errors = queue.get(timeout=120)
    reader.join(timeout=60)
    assert errors == []


# ------------------------------------------------------------------------------------------ stale temporaries
def test_the_next_save_removes_temporaries_a_killed_save_left(saved, tmp_path):
    pipe, folder = saved
    target, data = _copy(folder, tmp_path)
    adapter = Path(data["requests"][0]["adapter"]["file"]).name
    stale = [target / ".ledger.json.k2j3h4g5.tmp", target / "adapters" / f".{adapter}.ab_cd123.tmp"]
    keep = [target / ".notes", target / "adapters" / "README"]
    for path in stale + keep:
        path.write_bytes(b"x")
    pipe.save_unlearning(target)
    assert [p.exists() for p in stale] == [False, False] and all(p.exists() for p in keep)

    out = tmp_path / "out"
    pipe.save_unlearned(out)
    leftover = tmp_path / ".out.abcd1234.tmp"
    leftover.mkdir()
    (leftover / "model_index.json").write_text("{}")
    other = tmp_path / ".other.abcd1234.tmp"
    other.mkdir()
    live = tmp_path / ".out.live0000.tmp"
    live.mkdir()
    with _atomic.folder_lock(live):  # a save in progress holds its staging folder: left alone
        pipe.save_unlearned(out)
    assert not leftover.exists() and other.exists() and live.exists()


# ------------------------------------------------------------------------------------ clear errors, values
def test_foreign_errors_become_clear_errors(saved, tmp_path, monkeypatch):
    pipe, _ = saved
    request_id = pipe.unlearning_ledger.ids()[0]
    with pytest.raises(TypeError, match="accelerator must be an accelerate.Accelerator.*'cpu'"):
        pipe.unlearn("dog", domain="object", accelerator="cpu", **FAST)
    with pytest.raises(ValueError, match="weight_name must be a plain file name"):
        pipe.export_lora(request_id, tmp_path / "lora", weight_name="a\x00b.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerError, match="exists and is not a folder"):
        pipe.save_unlearning(tmp_path / "file")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON"):
        du.load_pipeline(str(broken))
    out = tmp_path / "out"
    pipe.save_unlearned(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(export, "st_save", full)
    with pytest.raises(OSError, match=f"could not save the unlearned pipeline to {out}.*No space left"):
        pipe.save_unlearned(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


@pytest.mark.parametrize("evaluation", [{"ua": float("nan")}, {"x": object()}, {"a": {"b": float("inf")}}])
def test_evaluation_figures_must_be_finite_numbers_or_text(saved, tmp_path, evaluation):
    pipe, _ = saved
    with pytest.raises(ValueError, match=r"evaluation\['"):
        pipe.save_unlearned(tmp_path / "out", evaluation=evaluation)
    assert not (tmp_path / "out").exists()


def test_unchecked_values_are_refused(saved):
    pipe, _ = saved
    request_id = pipe.unlearning_ledger.ids()[0]
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
        pipe.audit_grid(request_id, "a cat", guidance_scale=float("nan"), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer >= 1 \(at most 1000000\)"):
        pipe.audit_grid(request_id, "a cat", num_inference_steps=10**9)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1 \(at most 1000000\)"):
        du.TrainingConfig(steps=10**7)
    with pytest.raises(ValueError, match=r"sampling_steps must be an integer >= 1 \(at most 1000000\)"):
        pipe.unlearn("dog", domain="object", sampling_steps=10**7)


def test_plan_strategy_keys_and_device_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: tiny\noutput: out\nstrategy: {strategy: sequential, junk: 1}\n"
                    "requests:\n  - {concept: cat, domain: object}\n")
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['junk'\]"):
        load_plan(plan)
    plan.write_text("model: tiny\noutput: out\ndevice: nonsense\nrequests:\n  - {concept: cat, domain: object}\n")
    with pytest.raises(PlanError, match="device 'nonsense' is not a torch device"):
        load_plan(plan)
    plan.write_text("model: tiny\noutput: out\ndevice: 'cuda:99'\nrequests:\n  - {concept: cat, domain: object}\n")
    import diffusers_unlearn.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(PlanError, match="'cuda:99' is not available"):
        run_plan(load_plan(plan), log=None)
