"""Saves survive a crash anywhere: the ledger folder and the save_unlearned folder are the old one or the new one,
complete, before and after every file operation of a save; files follow the umask; concurrent savers do not mix."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import stat
import threading

import pytest
import safetensors.torch
import torch
from conftest import FAST

import diffusers_unlearn as du
from diffusers_unlearn import _atomic
from diffusers_unlearn.engine import ledger as ledger_module
from diffusers_unlearn.engine.ledger import read_ledger_dir

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Crash(Exception):
    """The injected failure (a crash at that file operation)."""


def tree(folder) -> dict[str, str]:
    """Every non-hidden file under ``folder`` -> sha256 of its bytes ({} for a missing folder)."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = os.path.join(root, name)
                out[os.path.relpath(path, folder)] = _digest(path)
    return out


def _digest(path: str) -> str:
    """sha256 of a file's content; for safetensors, of its tensors and metadata (diffusers writes the metadata
    map in hash order, so the same LoRA can have different bytes)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".safetensors"):
        try:
            tensors = safetensors.torch.load(data)
        except Exception:  # noqa: BLE001 - a torn file hashes as bytes and fails the comparison
            return hashlib.sha256(data).hexdigest()
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        digest = hashlib.sha256(json.dumps(header.get("__metadata__", {}), sort_keys=True).encode())
        for key in sorted(tensors):
            digest.update(key.encode() + str(tensors[key].dtype).encode() + tensors[key].numpy().tobytes())
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


class FileOps:
    """Counts the file operations of a save; raises ``Crash`` at the ``crash_at``-th; before each one, calls
    ``check()``: the state a kill at that moment would leave on disk."""

    def __init__(self, monkeypatch, check, crash_at: int | None = None):
        self.count, self.names, self.crash_at, self.check, self.busy = 0, [], crash_at, check, False
        targets = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (os, "mkdir"),
                   (os, "fsync"), (os, "chmod"), (os, "fchmod"), (shutil, "rmtree"), (safetensors.torch, "save_file"),
                   (_atomic, "exchange_folders")]
        try:
            import transformers.modeling_utils as tmu

            targets.append((tmu, "safe_save_file"))
        except (ImportError, AttributeError):
            pass
        for owner, name in targets:
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))
        real_open, real_os_open = builtins.open, os.open

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._op("open")
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                self._op("os.open")
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open)

    def _op(self, name):
        if self.busy:
            return
        if self.check is not None:
            self.busy = True
            try:
                self.check()
            finally:
                self.busy = False
        self.count += 1
        self.names.append(name)
        if self.count == self.crash_at:
            raise Crash(f"crash at file operation {self.count} ({name})")

    def _wrap(self, function, name):
        def wrapper(*args, **kwargs):
            self._op(name)
            return function(*args, **kwargs)

        return wrapper


def crash_each(points, monkeypatch, reference_old, target, save, classify) -> list[str]:
    """For each k in ``points``: restore the old folder, fail the save at its k-th file operation, classify what is
    left ("old", "new" or "broken")."""
    outcomes = []
    for k in points:
        shutil.rmtree(target)
        shutil.copytree(reference_old, target)
        with monkeypatch.context() as patch:
            FileOps(patch, None, crash_at=k)  # the counting pass checked the state before every operation
            with pytest.raises(Crash):
                save(target)
        outcomes.append(classify())
    return outcomes


def _trained(concept, seed, domain="style"):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn(concept, domain=domain, seed=seed, **FAST)
    return pipe


@pytest.fixture(scope="module")
def writers():
    """Two pipelines on the same base whose ledgers reuse the id r0001 with different adapters."""
    a, b = _trained("van gogh", 0), _trained("cat", 1, domain="object")
    b.unlearn("dog", domain="object", seed=2, **FAST)
    assert a.unlearning_ledger.ids()[0] == b.unlearning_ledger.ids()[0] == "r0001"
    assert not torch.equal(a.request_adapter("r0001").tensors[next(iter(a.request_adapter("r0001").tensors))],
                           b.request_adapter("r0001").tensors[next(iter(b.request_adapter("r0001").tensors))])
    return a, b


def _ledger_state(folder):
    ledger, adapters = read_ledger_dir(folder)
    return ledger.to_dict(), {i: {k: t.clone() for k, t in a.tensors.items()} for i, a in adapters.items()}


def _same(state, other) -> bool:
    return state[0] == other[0] and state[1].keys() == other[1].keys() and all(
        state[1][i].keys() == other[1][i].keys() and all(torch.equal(state[1][i][k], other[1][i][k]) for k in state[1][i])
        for i in state[1])


def test_ledger_save_crashing_at_every_file_operation_leaves_the_old_or_the_new_ledger(writers, tmp_path, monkeypatch):
    old_pipe, new_pipe = writers
    monkeypatch.setattr(ledger_module, "folder_lock", lambda *a, **k: _null())  # the check reads inside the save
    reference_old, reference_new = tmp_path / "old", tmp_path / "new"
    old_pipe.save_unlearning(reference_old)
    new_pipe.save_unlearning(reference_new)
    old, new = _ledger_state(reference_old), _ledger_state(reference_new)
    target = tmp_path / "target"

    def check():
        state = _ledger_state(target)
        assert _same(state, old) or _same(state, new)

    shutil.copytree(reference_old, target)
    with monkeypatch.context() as patch:
        counting = FileOps(patch, check)
        new_pipe.save_unlearning(target)  # a kill before any operation leaves what check() saw
    total = counting.count
    assert total >= 8, counting.names  # adapters (temp file, write, fsync, rename) x 2, ledger.json, cleanup
    assert _same(_ledger_state(target), new)
    def classify():
        state = _ledger_state(target)
        return "new" if _same(state, new) else "old" if _same(state, old) else "broken"

    outcomes = crash_each(range(1, total + 1), monkeypatch, reference_old, target, new_pipe.save_unlearning, classify)
    assert "broken" not in outcomes and outcomes[0] == "old" and "new" in outcomes, outcomes
    # the fresh pipeline loads whatever was left, complete
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    assert fresh.load_unlearning(target) == new_pipe.unlearning_ledger.ids()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def crash_points(total: int, every_op: bool) -> list[int]:
    """Every operation (the slow run), or a spread plus the last 6, where the switch and the cleanup happen."""
    return list(range(1, total + 1)) if every_op else sorted({1, total // 3, 2 * total // 3, *range(total - 5, total + 1)})


@pytest.mark.parametrize("every_op", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_save_unlearned_crashing_at_every_file_operation_leaves_the_old_or_the_new_folder(writers, tmp_path,
                                                                                           monkeypatch, every_op):
    """Before every file operation of a save the target is the old or the new folder (what a kill there would
    leave); a failure at an operation (every one with ``-m slow``, a spread of them by default) leaves the same."""
    old_pipe, new_pipe = writers
    new_pipe.fold()  # saving a folded pipeline skips the fold/unfold rebuilds: the same files, faster
    try:
        _save_unlearned_crashes(old_pipe, new_pipe, tmp_path, monkeypatch, every_op)
    finally:
        new_pipe.unfold()


def _save_unlearned_crashes(old_pipe, new_pipe, tmp_path, monkeypatch, every_op):
    reference_old, reference_new = tmp_path / "old", tmp_path / "new"
    old_pipe.save_unlearned(reference_old)
    new_pipe.save_unlearned(reference_new)
    old, new = tree(reference_old), tree(reference_new)
    assert old != new and new == tree(new_pipe.save_unlearned(tmp_path / "again"))  # deterministic content
    target = tmp_path / "target"

    def check():
        assert tree(target) in (old, new)

    shutil.copytree(reference_old, target)
    with monkeypatch.context() as patch:
        counting = FileOps(patch, check)
        new_pipe.save_unlearned(target)
    total = counting.count
    assert tree(target) == new and total > 20, counting.names
    def classify():
        state = tree(target)
        return "new" if state == new else "old" if state == old else "broken"

    outcomes = crash_each(crash_points(total, every_op), monkeypatch, reference_old, target, new_pipe.save_unlearned,
                          classify)
    assert "broken" not in outcomes and outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    # no staging folder is left behind by a failed save (the cleanup ran), and the pipeline is as it was
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".target")) == []
    assert new_pipe.unlearning_mode == "folded"
    loaded = du.UnlearnStableDiffusionPipeline.from_pretrained(target)
    assert loaded.unlearning_ledger.ids() == new_pipe.unlearning_ledger.ids()


def test_saved_files_and_folders_follow_the_umask(writers, tmp_path):
    _, pipe = writers
    previous = os.umask(0o022)
    try:
        folder = pipe.save_unlearned(tmp_path / "saved")
        pipe.save_unlearning(tmp_path / "ledger")
        pipe.save_pretrained(tmp_path / "plain")
    finally:
        os.umask(previous)
    for root in (folder, tmp_path / "ledger", tmp_path / "plain"):
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
        wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if os.path.isdir(tmp_path / p) else 0o644)}
        assert not wrong, wrong
    previous = os.umask(0o077)
    try:
        strict = pipe.save_unlearned(tmp_path / "strict")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(strict.stat().st_mode) == 0o700
    assert stat.S_IMODE((strict / "unlearning" / "ledger.json").stat().st_mode) == 0o600


def test_concurrent_savers_with_different_ledgers_leave_one_of_them_whole(writers, tmp_path):
    a, b = writers
    expected = {}
    for name, pipe in (("a", a), ("b", b)):
        pipe.save_unlearning(tmp_path / name)
        expected[name] = _ledger_state(tmp_path / name)
    assert not _same(expected["a"], expected["b"])
    target = tmp_path / "target"
    a.save_unlearning(target)
    errors, seen = [], []

    def save(pipe):
        try:
            for _ in range(15):
                pipe.save_unlearning(target)
        except BaseException as err:  # reported below
            errors.append(err)

    def read():
        try:
            for _ in range(30):
                state = _ledger_state(target)
                seen.append("a" if _same(state, expected["a"]) else "b" if _same(state, expected["b"]) else "mixed")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=save, args=(p,)) for p in (a, b)] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert "mixed" not in seen and len(seen) == 30
    final = _ledger_state(target)
    assert _same(final, expected["a"]) or _same(final, expected["b"])
    # exactly the final ledger's adapter files remain
    names = sorted(f"adapters/{p.name}" for p in (target / "adapters").iterdir())
    assert names == sorted(r["adapter"]["file"] for r in final[0]["requests"])
