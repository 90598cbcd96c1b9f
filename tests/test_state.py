"""state.py: the one place that reads or changes a pipeline's unlearning state, and the one-thread guard on it."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import kv_state
from peft import LoraConfig
from test_erasure_check import ROOM

import diffusers_unlearn as du
from diffusers_unlearn.engine import state as st


class Holder:
    """Stands for a pipeline in the guard tests: the guard lives in the object's ``__dict__``."""

    @st.one_thread
    def items(self):
        yield 1
        yield 2


def _try_from_another_thread(obj, what="fold"):
    """'entered' if another thread may use ``obj`` now (and leaves again), else the PipelineBusyError message."""
    seen = []

    def run():
        try:
            st.enter_pipeline(obj, what)
        except st.PipelineBusyError as err:
            seen.append(str(err))
        else:
            seen.append("entered")
            st.leave_pipeline(obj)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return seen[0]


def test_the_guard_is_reentrant_for_its_thread_and_refuses_every_other_until_the_last_exit():
    pipe = Holder()
    st.enter_pipeline(pipe, "unlearn")
    st.enter_pipeline(pipe, "audit")  # the same thread again: allowed
    busy = _try_from_another_thread(pipe)
    assert "running unlearn() on it" in busy and "this thread called fold()" in busy
    st.leave_pipeline(pipe)
    assert _try_from_another_thread(pipe) != "entered"  # one exit of two: still held
    st.leave_pipeline(pipe)
    assert _try_from_another_thread(pipe) == "entered"


def test_a_guarded_generator_holds_the_pipeline_until_it_finishes():
    pipe = Holder()
    items = pipe.items()
    assert next(items) == 1
    assert "running items() on it" in _try_from_another_thread(pipe)
    assert list(items) == [2]
    assert _try_from_another_thread(pipe) == "entered"


def test_a_copied_pipeline_has_a_free_guard_of_its_own():
    pipe = Holder()
    st.enter_pipeline(pipe, "unlearn")
    try:
        copied = copy.deepcopy(pipe)
        assert _try_from_another_thread(copied) == "entered"
        assert _try_from_another_thread(pipe) != "entered"
    finally:
        st.leave_pipeline(pipe)


def test_an_unknown_request_id_is_a_key_error_naming_the_known_ids():
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    for bad in ("r0001", 1, None):
        with pytest.raises(KeyError) as caught:
            st.check_request_id(pipe, bad)
        assert isinstance(caught.value, du.UnknownRequestError)
        assert str(caught.value) == f"no request {bad!r} in the ledger; known request ids: none (the ledger is empty)"


def test_a_failed_mode_switch_puts_back_the_mode_and_the_exact_kv_state(monkeypatch):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", **ROOM)
    before, modes = kv_state(pipe), []
    real = st.materialize

    def fails_after_folding(unet, base, requests, mode, strategy):
        modes.append(mode)
        real(unet, base, requests, mode, strategy)
        if len(modes) == 1:  # the UNet is already folded when the switch fails
            raise RuntimeError("interrupted")

    monkeypatch.setattr(st, "materialize", fails_after_folding)
    with pytest.raises(RuntimeError, match="interrupted"):
        st.set_mode(pipe, "folded")
    assert modes == ["folded", "stacked"] and pipe.unlearning_mode == "stacked"
    after = kv_state(pipe)  # copies of the stored base and factors: the same tensors, not a recomputation
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_a_denoiser_that_already_carries_lora_layers_is_refused_as_a_base():
    pipe = du.testing.tiny_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"]), adapter_name="someone_elses")
    with pytest.raises(ValueError, match=r"already carries peft/LoRA layers; fuse_lora\(\) and unload_lora\(\)"):
        du.attach(pipe)
    assert st.find_state(pipe) is None
