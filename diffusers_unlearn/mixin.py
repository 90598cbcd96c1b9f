"""``UnlearnMixin``: continual unlearning as pipeline methods, in the way diffusers' loader mixins add behaviour.

The pipeline keeps an ``UnlearningState``: a copy of the base K/V weights and their fingerprint, the ledger, one
artifact per request, and how they are composed (stacked adapters or folded weights). Every method that changes
the UNet rebuilds it from that state, so a failed or interrupted call restores exactly what was there before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from . import __version__
from . import adapters as ad
from ._validation import check_seed
from .composition import Mode, combined_deltas, materialize
from .conditioning import SUPPORTED_ARCHITECTURES
from .ledger import (
    Ledger,
    LedgerError,
    RequestRecord,
    check_adapter_fits,
    fingerprint,
    now,
    read_ledger_dir,
    write_ledger_dir,
)
from .merging import MergeStrategy, resolve_strategy, strategy_from_dict, strategy_to_dict
from .objectives import ObjectiveConfig, build_objective_config
from .prompts import TEMPLATES, check_concept, check_domain, validate_templates
from .regularizers import Regularizer, check_regularizers
from .trainer import TrainingConfig, TrainingResult, make_accelerator, train_request

logger = logging.getLogger(__name__)
STATE_ATTR = "_unlearning_state"


@dataclass
class _RequestSpec:
    """A fully validated request, ready to train."""

    concept: str
    domain: str
    objective_config: ObjectiveConfig
    training: TrainingConfig
    seed: int
    regularizers: list[Regularizer]
    strategy: str | MergeStrategy
    prompts: list[str]
    templates: tuple[str, ...] | None


class UnknownRequestError(KeyError):
    """A request id that the ledger does not hold."""

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

    @property
    def strategy(self) -> str | MergeStrategy:
        if not self.ledger.requests:
            return "sequential"
        return strategy_from_dict(self.ledger.requests[0].strategy)

    def active(self, ids: Sequence[str] | None = None) -> list[tuple[str, ad.RequestAdapter]]:
        ids = self.ledger.ids() if ids is None else ids
        return [(i, self.artifacts[i]) for i in ids]


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines whose denoiser has no cross-attention K/V layers, naming what is supported."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not ad.kv_module_names(unet):
        denoiser = type(getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or pipe).__name__
        raise TypeError(
            f"{type(pipe).__name__} (denoiser {denoiser}) has no UNet cross-attention K/V layers to unlearn on; "
            f"supported: {SUPPORTED_ARCHITECTURES}"
        )


class UnlearnMixin:
    """Adds continual unlearning to a diffusers pipeline with a cross-attention UNet.

    Use ``du.attach(pipe)`` on an existing pipeline, or a ready class such as ``UnlearnStableDiffusionPipeline``.
    """

    # ----------------------------------------------------------------------------------------------- state
    def _unlearning(self) -> UnlearningState:
        state = self.__dict__.get(STATE_ATTR)
        if state is None:
            check_pipeline(self)
            unet = self.unet
            if any(isinstance(m, ad.LoraLayer) for m in unet.modules()):
                raise ValueError(
                    "the UNet already carries peft/LoRA layers; fuse_lora() and unload_lora() them before unlearning "
                    "(unlearning needs the plain K/V weights as its base)"
                )
            base = {name: w.detach().clone() for name, w in ad.kv_weights(unet).items()}
            # Loaded from a save_unlearned folder, the UNet holds FOLDED weights: the true base, the ledger and the
            # adapters come from the folder's unlearning/ (None for any other pipeline).
            from .export import restore_saved_state

            state = restore_saved_state(self, base)
            if state is None:
                key = fingerprint(base)
                state = UnlearningState(base_weights=base, base_fingerprint=key, ledger=Ledger(key))
            object.__setattr__(self, STATE_ATTR, state)
        return state

    def _rebuild(self, ids: Sequence[str] | None = None, mode: Mode | None = None) -> None:
        state = self._unlearning()
        materialize(self.unet, state.base_weights, state.active(ids), mode or state.mode, state.strategy)

    # -------------------------------------------------------------------------------------------- queries
    @property
    def removed_concepts(self) -> list[str]:
        """Concepts of the active requests, in the order they were removed."""
        return [r.concept for r in self._unlearning().ledger.requests]

    @property
    def unlearning_ledger(self) -> Ledger:
        """The ledger (treat as read-only; change it through unlearn/rollback/load_unlearning)."""
        return self._unlearning().ledger

    @property
    def unlearning_mode(self) -> Mode:
        """"stacked" (the requests as one peft adapter on the base weights) or "folded" (baked into the weights)."""
        return self._unlearning().mode

    @property
    def base_fingerprint(self) -> str:
        return self._unlearning().base_fingerprint

    def request_adapter(self, request_id: str) -> ad.RequestAdapter:
        """The stored artifact of one request (factors or dense delta, float32, CPU)."""
        self._check_request_id(request_id)
        return self._unlearning().artifacts[request_id]

    def _check_request_id(self, request_id: object) -> str:
        state = self._unlearning()
        if not isinstance(request_id, str) or request_id not in state.artifacts:
            known = state.ledger.ids() or "none (the ledger is empty)"
            raise UnknownRequestError(f"no request {request_id!r} in the ledger; known request ids: {known}")
        return request_id

    # -------------------------------------------------------------------------------------------- unlearn
    def unlearn(
        self,
        concept: str,
        method: str | ObjectiveConfig = "esd",
        *,
        domain: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        regularizers: Sequence[Regularizer] | Regularizer | None = None,
        strategy: str | MergeStrategy | None = None,
        rank: int | Literal["full"] | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        training: TrainingConfig | None = None,
        prompts: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        progress: bool | None = None,
        accelerator: Accelerator | None = None,
        **method_options: Any,
    ) -> RequestRecord:
        """Remove ``concept`` with one new adapter trained on the current model; return its ledger record.

        Args:
            concept: what to remove, e.g. "van gogh".
            method: "esd", "ca" (needs ``anchor=``) or any registered method, or a ready method config.
            domain: "style", "object", "concept" (default) or a registered domain: picks the prompt templates.
            steps, rank, learning_rate, batch_size: shortcuts for the same ``TrainingConfig`` fields
                (``training=du.TrainingConfig(...)`` sets the rest: mixed precision, accumulation, checkpointing).
            seed: makes the request reproducible (adapter init, trajectories, minibatches).
            regularizers: e.g. ``[du.GradientProjection(retain=["monet"]), du.L2Drift(weight=1e3)]``.
            strategy: "sequential" (default: train on top of earlier requests) or "merge"/"ties"/
                "task_arithmetic"/"uniform"/``du.MergeStrategy`` (train from the base, combine deltas).
            prompts: explicit prompts instead of the domain templates; ``templates`` replaces the templates.
            progress: show a progress bar (default: follow the pipeline's ``set_progress_bar_config``).
            accelerator: an ``accelerate.Accelerator`` (default: one made from ``training``). Under
                ``accelerate launch`` every process runs this call; the global batch is split between them.
            **method_options: fields of the method's config, e.g. ``negative_guidance=2.0`` or ``anchor="a dog"``.

        A failed or interrupted request (exception, Ctrl-C) leaves the pipeline and the ledger as they were.
        """
        spec = self._prepare_request(
            concept, method, domain=domain, steps=steps, seed=seed, regularizers=regularizers, strategy=strategy,
            rank=rank, learning_rate=learning_rate, batch_size=batch_size, training=training, prompts=prompts,
            templates=templates, **method_options,
        )
        accelerator = self._place_on(accelerator or make_accelerator(spec.training))
        state = self._unlearning()
        try:
            result = self._train_request(spec, list(state.ledger.requests), accelerator, self._progress(progress))
        except BaseException:
            self._rebuild()
            raise
        return self._commit_request(spec, result)

    def unlearn_parallel(
        self,
        requests: Sequence[Mapping[str, Any]],
        *,
        strategy: str | MergeStrategy = "merge",
        accelerator: Accelerator | None = None,
        progress: bool | None = None,
    ) -> list[RequestRecord]:
        """Train independent (merge-strategy) requests in parallel, one per process, and add them all in order.

        ``requests`` holds ``unlearn`` keyword arguments, one mapping per request (``concept`` required). Under
        ``accelerate launch`` process i trains requests i, i + n, ...; the adapters are gathered and every
        process ends with the same ledger, equal to training the requests one after another with ``unlearn``.
        """
        chosen = resolve_strategy(strategy)
        if not isinstance(chosen, MergeStrategy):
            raise ValueError("unlearn_parallel trains requests independently from the base: it needs a merge "
                             f"strategy ('merge', 'ties', 'task_arithmetic', 'uniform'), got {strategy!r}")
        if isinstance(requests, Mapping) or not requests:
            raise ValueError(f"requests must be a non-empty list of unlearn() keyword mappings, got {requests!r}")
        specs = []
        for i, options in enumerate(requests):
            options = dict(options)
            if "concept" not in options:
                raise ValueError(f"request {i} has no 'concept': {options!r}")
            if options.pop("strategy", chosen) not in (chosen, strategy):
                raise ValueError(f"request {i} asks for another strategy than {strategy!r}")
            specs.append(self._prepare_request(options.pop("concept"), options.pop("method", "esd"),
                                               strategy=chosen, **options))
        accelerator = self._place_on(accelerator or make_accelerator(specs[0].training))
        state = self._unlearning()
        before = list(state.ledger.requests)
        mine = range(accelerator.process_index, len(specs), accelerator.num_processes)
        try:
            results = []
            for i in mine:
                # As if trained one after another: earlier requests of this batch count as removed before it.
                earlier = before + [SimpleNamespace(concept=s.concept, domain=s.domain) for s in specs[:i]]
                results.append((i, self._train_request(specs[i], earlier, accelerator, self._progress(progress),
                                                       data_parallel=False)))
            gathered = dict(gather_object(results)) if accelerator.num_processes > 1 else dict(results)
        except BaseException:
            self._rebuild()
            raise
        return [self._commit_request(specs[i], gathered[i]) for i in range(len(specs))]

    def _progress(self, progress: bool | None) -> bool:
        if progress is None:
            return not getattr(self, "_progress_bar_config", {}).get("disable", False)
        return bool(progress)

    def _place_on(self, accelerator: Accelerator) -> Accelerator:
        """Training runs on the accelerator's device (each process its own under ``accelerate launch``)."""
        here, there = self.unet.device, torch.device(accelerator.device)
        if here.type != there.type or (here.index or 0) != (there.index or 0):  # "cuda" is "cuda:0"
            logger.info("moving the pipeline from %s to %s for training", self.unet.device, accelerator.device)
            self.to(accelerator.device)
            state = self._unlearning()
            state.base_weights = {k: v.to(accelerator.device) for k, v in state.base_weights.items()}
        return accelerator

    def _prepare_request(
        self,
        concept: str,
        method: str | ObjectiveConfig = "esd",
        *,
        domain: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        regularizers: Sequence[Regularizer] | Regularizer | None = None,
        strategy: str | MergeStrategy | None = None,
        rank: int | Literal["full"] | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        training: TrainingConfig | None = None,
        prompts: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        **method_options: Any,
    ) -> _RequestSpec:
        """Validate a request completely, before anything touches the model."""
        state = self._unlearning()
        concept = check_concept(concept)
        domain = check_domain(domain)
        objective_config = build_objective_config(method, method_options)
        training = _training_config(training, steps, rank, learning_rate, batch_size)
        check_seed(seed)
        regs = check_regularizers(regularizers)
        for regularizer in regs:
            regularizer.check_request(concept, domain)
        chosen_strategy = resolve_strategy(strategy)
        if state.ledger.requests and strategy_to_dict(chosen_strategy) != strategy_to_dict(state.strategy):
            raise ValueError(
                f"this ledger composes requests with strategy {strategy_to_dict(state.strategy)}; the request asks "
                f"for {strategy_to_dict(chosen_strategy)}. One ledger uses one strategy: roll back or start anew."
            )
        used_templates: tuple[str, ...] | None = None
        if prompts is not None:
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
            request_prompts = list(prompts)
        else:
            used_templates = validate_templates(templates) if templates is not None else TEMPLATES[domain]
            request_prompts = [t.format(concept) for t in used_templates]
        return _RequestSpec(concept, domain, objective_config, training, seed, regs, chosen_strategy,
                            request_prompts, used_templates)

    def _train_request(
        self, spec: _RequestSpec, earlier: list[Any], accelerator: Accelerator, progress: bool,
        data_parallel: bool = True,
    ) -> TrainingResult:
        """Train one request on its start model (earlier requests folded in, or the base for merging).

        Leaves the UNet with the training adapter; callers rebuild the composed state afterwards.
        """
        state = self._unlearning()
        start = state.active() if not isinstance(spec.strategy, MergeStrategy) else []
        materialize(self.unet, state.base_weights, start, "folded", "sequential")
        return train_request(
            self,
            concept=spec.concept,
            domain=spec.domain,
            prompts=spec.prompts,
            templates=spec.templates,
            objective_config=spec.objective_config,
            regularizers=spec.regularizers,
            training=spec.training,
            seed=spec.seed,
            base_weights=state.base_weights,
            start_offsets=combined_deltas([a for _, a in start], "sequential"),
            earlier=earlier,
            progress=progress,
            accelerator=accelerator,
            data_parallel=data_parallel,
        )

    def _commit_request(self, spec: _RequestSpec, result: TrainingResult) -> RequestRecord:
        """Append the trained request to the ledger and rebuild the UNet with it (or undo both)."""
        state = self._unlearning()
        request_id = state.ledger.new_request_id()
        ranks = sorted({a.shape[0] for key, a in result.adapter.tensors.items() if key.endswith(".lora_A")})
        record = RequestRecord(
            request_id=request_id,
            index=state.ledger.next_index,
            concept=spec.concept,
            domain=spec.domain,
            method=spec.objective_config.method,
            method_config=spec.objective_config.to_dict(),
            strategy=strategy_to_dict(spec.strategy),
            regularizers=result.reports,
            adapter={"kind": result.adapter.kind, "ranks": ranks, "targets": list(ad.KV_SUFFIXES)},
            training=spec.training.to_dict(),
            prompts=spec.prompts,
            steps=spec.training.steps,
            seed=spec.seed,
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
            self._rebuild()
        except BaseException:
            state.ledger.requests.pop()
            del state.artifacts[request_id]
            state.ledger.next_index -= 1
            self._rebuild()
            raise
        return record

    # -------------------------------------------------------------------------------------- save and load
    def save_unlearning(self, directory: str | os.PathLike) -> None:
        """Write the ledger (JSON) and one safetensors adapter per request into ``directory``, atomically."""
        state = self._unlearning()
        write_ledger_dir(directory, state.ledger, state.artifacts)

    def load_unlearning(self, directory: str | os.PathLike, replace: bool = False) -> list[str]:
        """Load a saved ledger and its adapters onto this pipeline (same base weights); return the request ids.

        Everything is checked before anything changes. A pipeline that already holds requests is refused unless
        ``replace=True``.
        """
        state = self._unlearning()
        ledger, artifacts = read_ledger_dir(directory)
        if ledger.base_fingerprint != state.base_fingerprint:
            raise LedgerError(
                f"{directory} was made on base weights with fingerprint {ledger.base_fingerprint}, but this pipeline's "
                f"base has fingerprint {state.base_fingerprint}: load it onto the pipeline it was trained on"
            )
        shapes = {name: tuple(w.shape) for name, w in state.base_weights.items()}
        strategies = {str(strategy_from_dict(r.strategy)) for r in ledger.requests}
        if len(strategies) > 1:
            raise LedgerError(f"{directory} mixes composition strategies {sorted(strategies)}")
        for record in ledger.requests:
            check_adapter_fits(artifacts[record.request_id], shapes, f"{directory}/{record.adapter['file']}")
        if state.ledger.requests and not replace:
            raise ValueError(
                f"this pipeline already holds requests {state.ledger.ids()}; pass replace=True to swap them for "
                f"the ledger in {directory}"
            )
        previous = (state.ledger, state.artifacts)
        state.ledger, state.artifacts = ledger, artifacts
        try:
            self._rebuild()
        except BaseException:
            state.ledger, state.artifacts = previous
            self._rebuild()
            raise
        return ledger.ids()

    # ------------------------------------------------------------------------------ audit, rollback, fold
    @contextmanager
    def audit(self, request_id: str, mode: Literal["only", "without"] = "only") -> Iterator[Any]:
        """Within the block, only that request is active (``mode="only"``) or all but it (``"without"``).

        The previous state comes back on exit, also on exceptions.
        """
        state = self._unlearning()
        self._check_request_id(request_id)
        if mode not in ("only", "without"):
            raise ValueError(f"audit mode must be 'only' or 'without', got {mode!r}")
        ids = [request_id] if mode == "only" else [i for i in state.ledger.ids() if i != request_id]
        try:
            state.auditing = True
            self._rebuild(ids)
            yield self
        finally:
            state.auditing = False
            self._rebuild()

    def rollback(self, request_id: str) -> RequestRecord:
        """Drop one request (its adapter and record), keep the rest; returns the dropped record."""
        state = self._unlearning()
        self._check_request_id(request_id)
        record = state.ledger.get(request_id)
        artifact = state.artifacts.pop(request_id)
        position = state.ledger.requests.index(record)
        state.ledger.requests.remove(record)
        state.ledger.history.append({"event": "rollback", "request_id": request_id, "concept": record.concept, "at": now()})
        try:
            self._rebuild()
        except BaseException:
            state.ledger.requests.insert(position, record)
            state.ledger.history.pop()
            state.artifacts[request_id] = artifact
            self._rebuild()
            raise
        if state.mode == "folded":
            logger.warning("rolled back %s on a folded pipeline: re-folded the base weights (fingerprint %s) with the "
                           "remaining requests %s", request_id, state.base_fingerprint, state.ledger.ids())
        return record

    def fold(self) -> None:
        """Bake the active requests into the UNet's K/V weights (plain layers, no adapters, base speed)."""
        self._set_mode("folded")

    def unfold(self) -> None:
        """Back to the requests stacked as a peft adapter (``unlearn_stack``) on the base K/V weights."""
        self._set_mode("stacked")

    def _set_mode(self, mode: Mode) -> None:
        state = self._unlearning()
        previous, state.mode = state.mode, mode
        try:
            self._rebuild()
        except BaseException:
            state.mode = previous
            self._rebuild()
            raise

    # ------------------------------------------------------------------- deployment (export.py, hub.py, audit.py)
    def export_lora(self, request_id: str, directory: str | os.PathLike, weight_name: str | None = None) -> Any:
        """Write one request's adapter in diffusers' LoRA format (``directory/weight_name``, default
        ``<request_id>.safetensors``); plain diffusers' ``load_lora_weights`` on the base pipeline reproduces that
        request alone. Returns an ``export.LoraExport`` (path, ranks, size)."""
        from .export import export_lora

        return export_lora(self, request_id, directory, weight_name)

    def save_unlearned(
        self, directory: str | os.PathLike, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None
    ) -> Any:
        """Write a complete diffusers pipeline folder: folded weights, ``unlearning/`` (ledger, adapters, base K/V
        weights, diffusers-format LoRAs) and the model card ``README.md``. Plain ``DiffusionPipeline.from_pretrained``
        loads it; with this package it comes back with its ledger. The pipeline's mode is unchanged afterwards.

        Args:
            base_model: Hub id of the model before unlearning, for the card (default: the id it was loaded from).
            evaluation: overall evaluation figures for the card (per-request figures come from the ledger).
        """
        from .export import save_unlearned

        return save_unlearned(self, directory, base_model=base_model, evaluation=evaluation)

    def unlearned_model_card(self, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None) -> Any:
        """The model card ``save_unlearned`` writes (a ``huggingface_hub.ModelCard``), without the LoRA file table."""
        from .export import diffusers_class_name, guess_base_model
        from .model_card import build_model_card

        return build_model_card(self._unlearning().ledger, base_model=base_model or guess_base_model(self),
                                pipeline_class=diffusers_class_name(self), evaluation=evaluation)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        *,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        base_model: str | None = None,
        evaluation: dict[str, Any] | None = None,
    ) -> Any:
        """Save the unlearned pipeline (as ``save_unlearned``) and upload it in one commit; the repo is created if
        missing. Returns ``huggingface_hub.CommitInfo``. The token is only handed to ``huggingface_hub``."""
        import tempfile

        from .hub import check_repo_id, push_folder

        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="diffusers-unlearn-push-") as tmp:
            folder = self.save_unlearned(os.path.join(tmp, "pipeline"), base_model=base_model, evaluation=evaluation)
            return push_folder(folder, repo_id, private=private, token=token, create_pr=create_pr,
                               commit_message=commit_message)

    def audit_grid(self, request_id: str, prompt: str, **kwargs: Any) -> Any:
        """A 2x2 PIL image: the same prompt and seed on the base, all requests, only ``request_id`` and all but it,
        with captions. ``kwargs``: ``num_inference_steps``, ``seed``, ``guidance_scale`` and other pipeline args."""
        from .audit import audit_grid

        return audit_grid(self, request_id, prompt, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, made safe for plain diffusers: stacked requests are folded for the save
        (a UNet saved with peft wrappers loads with random K/V weights) and model_index.json names the diffusers
        class. Writes no ledger: ``save_unlearned`` writes the complete, restorable folder."""
        from .export import save_pretrained_folded

        save_pretrained_folded(
            self, save_directory, lambda: super(UnlearnMixin, self).save_pretrained(save_directory, *args, **kwargs)
        )


def _training_config(
    training: TrainingConfig | None, steps: int | None, rank: Any, learning_rate: float | None, batch_size: int | None
) -> TrainingConfig:
    if training is not None and not isinstance(training, TrainingConfig):
        raise TypeError(f"training must be a du.TrainingConfig, got {training!r}")
    values = (training or TrainingConfig()).to_dict()
    for key, value in (("steps", steps), ("rank", rank), ("learning_rate", learning_rate), ("batch_size", batch_size)):
        if value is not None:
            values[key] = value
    return TrainingConfig(**values)


_MIXED_CLASSES: dict[type, type] = {}


def attach(pipe: Any) -> Any:
    """Give an existing pipeline instance the ``UnlearnMixin`` behaviour; returns the same object.

    The instance's class becomes a subclass of its own class and ``UnlearnMixin`` with the same name, so
    ``save_pretrained`` still writes the original class name and plain diffusers loads the folder.
    """
    check_pipeline(pipe)
    if not isinstance(pipe, UnlearnMixin):
        cls = type(pipe)
        if cls not in _MIXED_CLASSES:
            _MIXED_CLASSES[cls] = type(cls.__name__, (UnlearnMixin, cls), {"__module__": cls.__module__})
        pipe.__class__ = _MIXED_CLASSES[cls]
    pipe._unlearning()
    return pipe
