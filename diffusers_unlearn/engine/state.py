"""The unlearning state of a pipeline, and the one place that reads or changes it.

A pipeline's ``UnlearningState`` holds a copy of the base K/V weights and their fingerprint, the ledger, one
artifact per request, and how they are composed (stacked adapters or folded weights). Every change of the UNet
goes through ``rebuild``: the UNet's K/V state is rebuilt from the state, never patched, so a failed or interrupted
call can restore exactly what was there before.

Layers above (the mixins, export, audit, analysis, evaluation, the command line) use ``unlearning_state``,
``check_request_id``, ``rebuild`` and ``set_mode`` instead of the pipeline's private attributes.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..kv import adapters as ad
from ..kv.composition import Mode, combined_deltas, materialize
from ..families.registry import denoiser_of, family_of
from .ledger import Ledger, fingerprint
from ..kv.merging import MergeStrategy, strategy_from_dict
from .saved_folder import read_saved_unlearning

STATE_ATTR = "_unlearning_state"
GUARD_ATTR = "_unlearning_guard"
_F = TypeVar("_F", bound=Callable[..., Any])


class PipelineBusyError(RuntimeError):
    """A pipeline's unlearning state is in use by another thread.

    One pipeline is used by one thread at a time: every method that reads or changes the unlearning state refuses
    a second thread at once instead of interleaving with the first. Give each thread its own pipeline (processes
    coordinate through the lock of a saved folder).
    """


class _Guard:
    """Which thread uses a pipeline's unlearning state now; re-entrant for that thread, refused for any other."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.depth = 0
        self.what = ""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Guard:  # a copied pipeline is free: a guard of its own
        return _Guard()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Guard, ())


def _guard_of(pipe: Any) -> _Guard:
    return pipe.__dict__.setdefault(GUARD_ATTR, _Guard())  # setdefault is atomic: one guard per pipeline


def enter_pipeline(pipe: Any, what: str) -> None:
    """Mark ``pipe`` as used by this thread for ``what``; ``PipelineBusyError`` if another thread uses it."""
    guard, me = _guard_of(pipe), threading.get_ident()
    with guard.lock:
        if guard.owner not in (None, me):
            raise PipelineBusyError(
                f"{type(pipe).__name__} at 0x{id(pipe):x} is busy: another thread is running {guard.what}() on it, "
                f"and this thread called {what}(). One pipeline is used by one thread at a time: give each thread "
                "its own pipeline (processes coordinate through the lock of a saved folder)"
            )
        if guard.owner is None:
            guard.owner, guard.what = me, what
        guard.depth += 1


def leave_pipeline(pipe: Any) -> None:
    guard = _guard_of(pipe)
    with guard.lock:
        guard.depth -= 1
        if guard.depth <= 0:
            guard.owner, guard.depth, guard.what = None, 0, ""


def one_thread(method: _F) -> _F:
    """Decorate a pipeline method that reads or changes the unlearning state: while it runs (for a generator, until
    it finishes), another thread calling any such method on the same pipeline gets ``PipelineBusyError``."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def generator(self: Any, *args: Any, **kwargs: Any) -> Any:
            enter_pipeline(self, method.__name__)
            try:
                return (yield from method(self, *args, **kwargs))
            finally:
                leave_pipeline(self)
        return generator  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        enter_pipeline(self, method.__name__)
        try:
            return method(self, *args, **kwargs)
        finally:
            leave_pipeline(self)
    return wrapper  # type: ignore[return-value]


class UnknownRequestError(KeyError):
    """A request id that the ledger does not hold; the message names the known ids.

    A ``KeyError``, so ``except KeyError`` around ``pipe.audit(...)`` or ``pipe.rollback(...)`` keeps working.
    """

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass
class UnlearningState:
    base_weights: dict[str, torch.Tensor]
    base_fingerprint: str
    ledger: Ledger
    artifacts: dict[str, ad.RequestAdapter] = field(default_factory=dict)
    mode: Mode = "stacked"
    auditing: bool = False  # inside audit(): the UNet holds a partial set of requests
    origin: dict[str, Any] = field(default_factory=dict)  # restored from a saved folder: its path and base model id

    @property
    def strategy(self) -> str | MergeStrategy:
        if not self.ledger.requests:
            return "sequential"
        return strategy_from_dict(self.ledger.requests[0].strategy)

    def active(self, ids: Sequence[str] | None = None) -> list[tuple[str, ad.RequestAdapter]]:
        ids = self.ledger.ids() if ids is None else ids
        return [(i, self.artifacts[i]) for i in ids]

    def check_request_id(self, request_id: object) -> str:
        """``request_id`` if the ledger holds it; otherwise ``UnknownRequestError`` naming the known ids."""
        if not isinstance(request_id, str) or request_id not in self.artifacts:
            known = self.ledger.ids() or "none (the ledger is empty)"
            raise UnknownRequestError(f"no request {request_id!r} in the ledger; known request ids: {known}")
        return request_id

    def composed_deltas(self) -> dict[str, torch.Tensor] | None:
        """Per-layer change of the active requests as composed (summed or merged); None when there are none."""
        return combined_deltas([artifact for _, artifact in self.active()], self.strategy)

    def artifact(self, request_id: str) -> ad.RequestAdapter:
        """The stored artifact of one request (factors or dense delta, float32, CPU)."""
        return self.artifacts[self.check_request_id(request_id)]


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines whose denoiser has no text K/V layers of a known family, naming what is supported."""
    family = family_of(pipe)  # TypeError for unknown denoisers
    if not ad.kv_module_names(denoiser_of(pipe)):
        raise TypeError(
            f"{type(pipe).__name__}'s {type(denoiser_of(pipe)).__name__} has no {' / '.join(family.kv_suffixes)} "
            f"layers to unlearn on (an unconditional model?); supported: {family.description}"
        )


def find_state(pipe: Any) -> UnlearningState | None:
    """The pipeline's state if it has one already (None: it never unlearned nor was attached)."""
    return pipe.__dict__.get(STATE_ATTR)


def unlearning_state(pipe: Any) -> UnlearningState:
    """The pipeline's state, made on first use: the current K/V weights become the base, or, for a pipeline loaded
    from a ``save_unlearned`` folder (its UNet holds FOLDED weights), the base, ledger and adapters come from it."""
    state = find_state(pipe)
    if state is not None:
        return state
    check_pipeline(pipe)
    unet = denoiser_of(pipe)  # the UNet, or the transformer of SD3 / Flux
    if any(isinstance(m, ad.LoraLayer) for m in unet.modules()):
        raise ValueError(
            f"the {type(unet).__name__} already carries peft/LoRA layers; fuse_lora() and unload_lora() them before unlearning "
            "(unlearning needs the plain K/V weights as its base)"
        )
    base = {name: w.detach().clone() for name, w in ad.kv_weights(unet).items()}
    saved = read_saved_unlearning(pipe, base)
    if saved is None:
        key = fingerprint(base)
        state = UnlearningState(base_weights=base, base_fingerprint=key, ledger=Ledger(key))
    else:
        state = UnlearningState(base_weights=saved.base_weights, base_fingerprint=saved.ledger.base_fingerprint,
                                ledger=saved.ledger, artifacts=saved.artifacts, mode="folded", origin=saved.origin)
    object.__setattr__(pipe, STATE_ATTR, state)  # bypasses diffusers' __setattr__, which registers config entries
    return state


def check_request_id(pipe: Any, request_id: object) -> str:
    """``request_id`` if the pipeline's ledger holds it; otherwise ``UnknownRequestError`` naming the known ids."""
    return unlearning_state(pipe).check_request_id(request_id)


def rebuild(pipe: Any, ids: Sequence[str] | None = None, mode: Mode | None = None) -> None:
    """Put requests ``ids`` (default: every active one) into the UNet in ``mode`` (default: the state's mode)."""
    state = unlearning_state(pipe)
    materialize(denoiser_of(pipe), state.base_weights, state.active(ids), mode or state.mode, state.strategy)


def set_mode(pipe: Any, mode: Mode) -> None:
    """Switch between "stacked" and "folded"; on failure the previous mode comes back."""
    state = unlearning_state(pipe)
    previous, state.mode = state.mode, mode
    try:
        rebuild(pipe)
    except BaseException:
        state.mode = previous
        rebuild(pipe)
        raise
