"""``RequestStreamMixin``: unlearn, audit, roll back and fold requests on a pipeline.

The pipeline's ``state.UnlearningState`` holds the base K/V weights, the ledger, one artifact per request and how
they are composed. Every method that changes the UNet rebuilds it from that state, so a failed or interrupted call
restores exactly what was there before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..kv import adapters as ad
from .._progress import phase
from .._version import __version__
from ..engine.audit import audit_grid
from ..engine.defaults import escalation_unless_set, recommended_escalation
from ..kv.composition import Mode, combined_deltas, materialize
from ..engine.erasure_check import ErasureError, measure_erasure, report_erasure
from ..engine.escalation import check_erasure_check, effective_escalation, escalated_requests, escalation_options
from ..families.registry import denoiser_of, family_of
from ..engine.ledger import Ledger, RequestRecord, now
from ..kv.merging import MergeStrategy, resolve_strategy, strategy_to_dict
from ..objectives import ObjectiveConfig, SolveContext, SolvedObjective, build_objective_config, objective_class
from ..engine.request import UnlearnRequest, resolve_request
from ..engine.state import UnlearningState, check_request_id, one_thread, rebuild, set_mode, unlearning_state
from ..engine.trainer import TrainingResult, make_accelerator, train_request
from ..worlds import check_world_concept

logger = logging.getLogger(__name__)


class RequestStreamMixin:
    """Unlearning on a diffusers pipeline of a supported family (SD 1.x/2.x and SDXL UNets, SD3 and Flux
    transformers: ``families/registry.py``): ``unlearn``, ``unlearn_parallel``, ``audit``, ``rollback``, ``fold`` /
    ``unfold``, and what the pipeline holds (ledger, removed concepts)."""

    @property
    def unlearning_denoiser(self) -> torch.nn.Module:
        """The model the requests adapt: the UNet, or the transformer of SD3 / Flux."""
        return denoiser_of(self)

    # kept as methods for callers of earlier versions; the state and its interface live in ``state``
    def _unlearning(self) -> UnlearningState:
        return unlearning_state(self)

    def _rebuild(self, ids: Sequence[str] | None = None, mode: Mode | None = None) -> None:
        rebuild(self, ids, mode)

    def _check_request_id(self, request_id: object) -> str:
        return check_request_id(self, request_id)

    # -------------------------------------------------------------------------------------------- queries
    @property
    def removed_concepts(self) -> list[str]:
        """Concepts of the active requests, in the order they were removed (every concept of a request of several)."""
        return [c for r in unlearning_state(self).ledger.requests for c in r.concepts]

    @property
    def unlearning_ledger(self) -> Ledger:
        """The ledger (treat as read-only; change it through unlearn/rollback/load_unlearning)."""
        return unlearning_state(self).ledger

    @property
    def unlearning_mode(self) -> Mode:
        """"stacked" (the requests as one peft adapter on the base weights) or "folded" (baked into the weights)."""
        return unlearning_state(self).mode

    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base weights the requests were made on; a saved ledger refuses another base."""
        return unlearning_state(self).base_fingerprint

    def request_adapter(self, request_id: str) -> ad.RequestAdapter:
        """The stored artifact of one request (factors or dense delta, float32, CPU).

        Args:
            request_id: the request whose adapter to return, e.g. "r0003".

        Returns:
            The request's ``RequestAdapter``.
        """
        return unlearning_state(self).artifact(request_id)

    # -------------------------------------------------------------------------------------------- unlearn
    @one_thread
    def unlearn(
        self,
        concept: str | UnlearnRequest,
        method: str | ObjectiveConfig | None = None,
        *,
        progress: bool | None = None,
        accelerator: Accelerator | None = None,
        require_erasure: bool = False,
        erasure_check: Any = None,
        escalate: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> RequestRecord:
        """Remove ``concept`` with one new adapter trained on the current model; return its ledger record.

        Args:
            concept: what to remove, e.g. "van gogh"; a list of distinct concepts (``["van gogh", "monet"]``) is one
                request that removes them all (one ledger entry and adapter: the closed form solves them jointly,
                a trained method samples them in one run); or a ready ``du.UnlearnRequest`` (then no other
                argument but ``progress`` and ``accelerator``).
            method: "closed_form", "esd", "ca" (needs ``anchor=``) or any registered method, or a ready method
                config. None (default): the recommended method (``engine/defaults.py``: "closed_form" on UNets, "esd" on SD3
                and Flux), or "esd" when training settings or regularizers are given.
            require_erasure: raise ``ErasureError`` (and commit nothing) when the closing erasure check finds that
                the concept barely moved; by default such a request is committed with an ``ErasureWarning``.
            erasure_check: how the closing check decides (default ``du.ErasureCheck()``: the shift of the concept's
                noise prediction); ``du.ClassifierCheck(classifier, templates, seeds)`` asks a classifier whether
                images of the concept are still recognised.
            escalate: method settings to try, in order, while the check finds the concept not erased, e.g.
                ``[{"negative_guidance": 2.0}, {"negative_guidance": 3.0}]`` (``engine/escalation.py``); each failed attempt
                is undone, and the committed record lists them. None (default): a request that names no method and
                none of the settings the ladder changes (``ridge``, ``negative_guidance``) gets the recommended
                ladder of its domain (``RECOMMENDED_ESCALATION``: a style is solved again without the ridge, then
                with guidance 1, then 2); ``[]``: none.
            progress: show a progress bar (default: follow the pipeline's ``set_progress_bar_config``).
            accelerator: an ``accelerate.Accelerator`` (default: one made from ``training``). Under
                ``accelerate launch`` every process runs this call; the global batch is split between them.
            **options: the request, as ``request.resolve_request`` takes it:

                - domain: "style", "object", "concept" (default) or a registered domain: picks the templates.
                - steps, rank, learning_rate, batch_size: shortcuts for the same ``TrainingConfig`` fields
                  (``training=du.TrainingConfig(...)`` sets the rest: mixed precision, accumulation, checkpointing).
                - seed: makes the request reproducible (adapter init, trajectories, minibatches).
                - regularizers: e.g. ``[du.GradientProjection(keep=["monet"]), du.L2Drift(weight=1e3)]``.
                - strategy: "sequential" (default: train on top of earlier requests) or "merge"/"ties"/
                  "task_arithmetic"/"uniform"/``du.MergeStrategy`` (train from the base, combine deltas).
                - prompts: explicit prompts instead of the domain templates; ``templates`` replaces the templates.
                - keep: concepts that must survive, a list (the request's domain) or ``{domain: [concepts]}``;
                  every method honours it (``request.keep_concepts``).
                - any other name: a field of the method's config, e.g. ``negative_guidance=2.0``, ``anchor="a dog"``.

        Every request ends with an erasure check (``engine/erasure_check.py``); its figures are in ``record.erasure``.
        A failed or interrupted request (exception, Ctrl-C) leaves the pipeline and the ledger as they were.
        """
        if not isinstance(require_erasure, bool):
            raise TypeError(f"require_erasure must be True or False, got {require_erasure!r}")
        if isinstance(concept, UnlearnRequest):
            extra = sorted([*options, *(["method"] if method is not None else [])])
            if extra:
                raise TypeError(f"unlearn() got a ready UnlearnRequest and also {extra}; set them on the request")
            request = concept
        else:
            request = resolve_request(concept, method, family=family_of(self), **options)
        for name in request.concepts:
            check_world_concept(self, name, request.domain, prompts_given=request.templates is None)
        check = check_erasure_check(erasure_check)
        if escalate is None and method is None and not isinstance(concept, UnlearnRequest):
            # the recommended recipe: a concept the check still finds is solved again more strongly
            escalate = escalation_unless_set(recommended_escalation(request.domain, request.method.method), options)
        escalate = effective_escalation(request, escalate)
        attempts = escalated_requests(request, escalate)
        for attempt in attempts:
            self._check_fits_ledger(attempt)
        accelerator = self._place_on(accelerator or make_accelerator(request.training))
        state = unlearning_state(self)
        failed: list[dict[str, Any]] = []
        for i, attempt in enumerate(attempts):
            last = i == len(attempts) - 1
            try:
                result = self._train_request(attempt, list(state.ledger.requests), accelerator,
                                             self._progress(progress))
            except BaseException:
                rebuild(self)
                raise
            try:
                return self._commit_request(attempt, result, require_erasure or not last, check, failed)
            except ErasureError as error:
                if last:
                    raise
                failed.append({"options": escalation_options(escalate, i),
                               **{k: v for k, v in error.figures.items() if k != "probe"}})  # the same probe
        raise AssertionError("unreachable: the last attempt returns or raises")

    @one_thread
    def unlearn_parallel(
        self,
        requests: Sequence[Mapping[str, Any] | UnlearnRequest],
        *,
        strategy: str | MergeStrategy = "merge",
        accelerator: Accelerator | None = None,
        progress: bool | None = None,
    ) -> list[RequestRecord]:
        """Train independent (merge-strategy) requests in parallel, one per process, and add them all in order.

        ``requests`` holds ``unlearn`` keyword arguments, one mapping per request (``concept`` required), or ready
        ``UnlearnRequest`` objects. Under ``accelerate launch`` process i trains requests i, i + n, ...; the adapters
        are gathered and every process ends with the same ledger, equal to training the requests one after another
        with ``unlearn``.

        Args:
            requests: ``unlearn`` keyword mappings (``concept`` required) or ready ``UnlearnRequest`` objects.
            strategy: the merge strategy every request shares ("merge", "ties", "task_arithmetic", "uniform" or a
                ``MergeStrategy``); requests are trained from the base, so a sequential strategy is refused.
            accelerator: an ``accelerate.Accelerator`` (default: one made from the first request's training).
            progress: show a progress bar (default: follow the pipeline's ``set_progress_bar_config``).

        Returns:
            The committed ledger records, in the order of ``requests``.

        Raises:
            ValueError: the strategy is not a merge strategy, ``requests`` is empty or not a list, a mapping has no
                ``concept`` or a request asks for another strategy.
        """
        chosen = resolve_strategy(strategy)
        if not isinstance(chosen, MergeStrategy):
            raise ValueError("unlearn_parallel trains requests independently from the base: it needs a merge "
                             f"strategy ('merge', 'ties', 'task_arithmetic', 'uniform'), got {strategy!r}")
        if isinstance(requests, Mapping) or not requests:
            raise ValueError(f"requests must be a non-empty list of unlearn() keyword mappings, got {requests!r}")
        built = []
        for i, options in enumerate(requests):
            if isinstance(options, UnlearnRequest):
                request = options
            else:
                options = dict(options)
                if "concept" not in options:
                    raise ValueError(f"request {i} has no 'concept': {options!r}")
                if options.pop("strategy", chosen) not in (chosen, strategy):
                    raise ValueError(f"request {i} asks for another strategy than {strategy!r}")
                request = UnlearnRequest.build(options.pop("concept"), options.pop("method", None), strategy=chosen,
                                               family=family_of(self), **options)
            if strategy_to_dict(request.strategy) != strategy_to_dict(chosen):
                raise ValueError(f"request {i} asks for another strategy than {strategy!r}")
            self._check_fits_ledger(request)
            built.append(request)
        accelerator = self._place_on(accelerator or make_accelerator(built[0].training))
        state = unlearning_state(self)
        before = list(state.ledger.requests)
        mine = range(accelerator.process_index, len(built), accelerator.num_processes)
        try:
            results = []
            for i in mine:
                # As if trained one after another: earlier requests of this batch count as removed before it.
                earlier = before + [SimpleNamespace(concept=r.concept, concepts=r.concepts, domain=r.domain)
                                    for r in built[:i]]
                results.append((i, self._train_request(built[i], earlier, accelerator, self._progress(progress),
                                                       data_parallel=False)))
            gathered = dict(gather_object(results)) if accelerator.num_processes > 1 else dict(results)
        except BaseException:
            rebuild(self)
            raise
        return [self._commit_request(built[i], gathered[i]) for i in range(len(built))]

    def _progress(self, progress: bool | None) -> bool:
        if progress is None:
            return not getattr(self, "_progress_bar_config", {}).get("disable", False)
        return bool(progress)

    def _place_on(self, accelerator: Accelerator) -> Accelerator:
        """Training runs on the accelerator's device (each process its own under ``accelerate launch``)."""
        if not isinstance(accelerator, Accelerator):
            raise TypeError(f"accelerator must be an accelerate.Accelerator (or None: one is made from the training "
                            f"settings), got {accelerator!r}; for a device, move the pipeline with pipe.to(...)")
        here, there = denoiser_of(self).device, torch.device(accelerator.device)
        if here.type != there.type or (here.index or 0) != (there.index or 0):  # "cuda" is "cuda:0"
            logger.info("moving the pipeline from %s to %s for training", here, accelerator.device)
            self.to(accelerator.device)
            state = unlearning_state(self)
            state.base_weights = {k: v.to(accelerator.device) for k, v in state.base_weights.items()}
        return accelerator

    def _check_fits_ledger(self, request: UnlearnRequest) -> None:
        """The request's regularizers accept it, and one ledger composes its requests with one strategy."""
        request.check_regularizers_fit()
        state = unlearning_state(self)
        if state.ledger.requests and strategy_to_dict(request.strategy) != strategy_to_dict(state.strategy):
            raise ValueError(
                f"this ledger composes requests with strategy {strategy_to_dict(state.strategy)}; the request asks "
                f"for {strategy_to_dict(request.strategy)}. One ledger uses one strategy: roll back or start anew."
            )

    def _train_request(
        self, request: UnlearnRequest, earlier: list[Any], accelerator: Accelerator, progress: bool,
        data_parallel: bool = True,
    ) -> TrainingResult:
        """Train one request on its start model (earlier requests folded in, or the base for merging).

        Leaves the UNet with the training adapter; callers rebuild the composed state afterwards.
        """
        state = unlearning_state(self)
        start = state.active() if not isinstance(request.strategy, MergeStrategy) else []
        materialize(denoiser_of(self), state.base_weights, start, "folded", "sequential")
        return train_request(self, request, base_weights=state.base_weights,
                             start_offsets=combined_deltas([a for _, a in start], "sequential"), earlier=earlier,
                             progress=progress, accelerator=accelerator, data_parallel=data_parallel)

    def _commit_request(self, request: UnlearnRequest, result: TrainingResult, require_erasure: bool = False,
                        check: Any = None, failed: Sequence[dict[str, Any]] = ()) -> RequestRecord:
        """Append the trained request to the ledger, rebuild the UNet with it and check that it erased with
        ``check`` (or undo all of it); ``failed``: the figures of escalation attempts before this one."""
        state = unlearning_state(self)
        request_id = state.ledger.new_request_id()
        ranks = sorted({a.shape[0] for key, a in result.adapter.tensors.items() if key.endswith(".lora_A")})
        fields = request.record_fields()
        if result.steps is not None:  # a closed-form solve takes no training steps
            fields["steps"] = result.steps
        record = RequestRecord(
            request_id=request_id,
            index=state.ledger.next_index,
            **fields,
            regularizers=result.reports,
            adapter={"kind": result.adapter.kind, "ranks": ranks, "targets": list(family_of(self).kv_suffixes)},
            seconds=round(result.seconds, 3),
            timing=result.timing,
            final_loss=result.final_loss,
            base_fingerprint=state.base_fingerprint,
            library_version=__version__,
            created_at=result.finished_at,
        )
        state.ledger.requests.append(record)
        state.artifacts[request_id] = result.adapter
        state.ledger.next_index += 1
        try:
            rebuild(self)
            with phase(f"checking that {request.concept!r} is erased", self._progress(None)):
                record.erasure = measure_erasure(check_erasure_check(check), self, request_id, request)
            if failed:
                record.erasure["attempts"] = [dict(f) for f in failed]
            report_erasure(request.concept, record.erasure, require_erasure, request.method.method)
        except BaseException:
            state.ledger.requests.pop()
            del state.artifacts[request_id]
            state.ledger.next_index -= 1
            rebuild(self)
            raise
        return record

    # ------------------------------------------------------------------------------ audit, rollback, fold
    @contextmanager
    @one_thread
    def audit(self, request_id: str, mode: Literal["only", "without"] = "only") -> Iterator[Any]:
        """Within the block, only that request is active (``mode="only"``) or all but it (``"without"``).

        The previous state comes back on exit, also on exceptions.

        Args:
            request_id: the request to isolate, e.g. "r0003".
            mode: "only" (just this request active) or "without" (every request but this one).

        Returns:
            A context manager that yields the pipeline itself.

        Raises:
            UnknownRequestError: the ledger holds no ``request_id``.
            ValueError: ``mode`` is neither "only" nor "without".
        """
        state = unlearning_state(self)
        check_request_id(self, request_id)
        if mode not in ("only", "without"):
            raise ValueError(f"audit mode must be 'only' or 'without', got {mode!r}")
        ids = [request_id] if mode == "only" else [i for i in state.ledger.ids() if i != request_id]
        try:
            state.auditing = True
            rebuild(self, ids)
            yield self
        finally:
            state.auditing = False
            rebuild(self)

    @one_thread
    def rollback(self, request_id: str) -> RequestRecord:
        """Drop one request (its adapter and record), keep the rest; returns the dropped record.

        Every request after it whose method is solved is offered a re-solve on the requests that remain, in ledger
        order (``SolvedObjective.after_rollback``; the closed form re-solves, since each of its requests was solved
        on top of, and keeping, the ones before it); the history entry lists those re-solved. Trained requests keep
        their adapters.

        Args:
            request_id: the request to drop, e.g. "r0003".

        Returns:
            The dropped request's ledger record.

        Raises:
            KeyError: no such request in the ledger. Whatever a re-solve raises; the pipeline is then left as it was.
        """
        state = unlearning_state(self)
        check_request_id(self, request_id)
        record = state.ledger.get(request_id)
        artifact = state.artifacts.pop(request_id)
        position = state.ledger.requests.index(record)
        state.ledger.requests.remove(record)
        event = {"event": "rollback", "request_id": request_id, "concept": record.concept,
                 **({"concepts": list(record.concepts)} if len(record.concepts) > 1 else {}), "at": now()}
        state.ledger.history.append(event)
        previous = dict(state.artifacts)
        try:
            resolved = self._resolve_after_rollback(state, position)
            state.artifacts.update(resolved)
            if resolved:
                event["resolved"] = sorted(resolved)
            rebuild(self)
        except BaseException:
            state.artifacts.clear()
            state.artifacts.update(previous)
            state.ledger.requests.insert(position, record)
            state.ledger.history.pop()
            state.artifacts[request_id] = artifact
            rebuild(self)
            raise
        if state.mode == "folded":
            logger.info("rolled back %s on a folded pipeline: re-folded the base weights (fingerprint %s) with the "
                           "remaining requests %s", request_id, state.base_fingerprint, state.ledger.ids())
        return record

    def _resolve_after_rollback(self, state: UnlearningState, position: int) -> dict[str, ad.RequestAdapter]:
        """New artifacts of the solved requests from ``position`` on, each offered its method's ``after_rollback``
        in ledger order, on the model as ``unlearn`` would now give it: the remaining requests before it (with the
        ones re-solved here) for a sequential ledger, the base for a merge strategy. Returns {request_id: artifact}."""
        records = state.ledger.requests
        artifacts = dict(state.artifacts)
        replaced: dict[str, ad.RequestAdapter] = {}
        for index in range(position, len(records)):
            record = records[index]
            method_class = objective_class(record.method)
            if not issubclass(method_class, SolvedObjective):
                continue
            config = build_objective_config(record.method, {k: v for k, v in record.method_config.items()
                                                            if k != "method"})
            before = [] if isinstance(state.strategy, MergeStrategy) else [artifacts[r.request_id]
                                                                           for r in records[:index]]
            adapter = method_class(config).after_rollback(SolveContext(
                pipe=self, concept=record.concept, domain=record.domain, prompts=list(record.prompts),
                base_weights=state.base_weights, start_offsets=combined_deltas(before, "sequential"),
                earlier=records[:index], seed=record.seed, progress=False, concepts=tuple(record.concepts)))
            if adapter is not None:
                artifacts[record.request_id] = replaced[record.request_id] = adapter
        return replaced

    @one_thread
    def fold(self) -> None:
        """Bake the active requests into the UNet's K/V weights (plain layers, no adapters, base speed)."""
        set_mode(self, "folded")

    @one_thread
    def unfold(self) -> None:
        """Back to the requests stacked as a peft adapter (``unlearn_stack``) on the base K/V weights."""
        set_mode(self, "stacked")

    @one_thread
    def audit_grid(self, request_id: str, prompt: str, **kwargs: Any) -> Any:
        """A 2x2 PIL image: the same prompt and seed on the base, all requests, only ``request_id`` and all but it,
        with captions, to see at a glance what one request changes.

        Args:
            request_id: the request to show alone and left out, e.g. "r0003".
            prompt: the prompt rendered in all four panels.
            **kwargs: ``num_inference_steps``, ``seed``, ``guidance_scale`` and other pipeline arguments.

        Returns:
            The captioned grid as one PIL image.
        """
        return audit_grid(self, request_id, prompt, **kwargs)
