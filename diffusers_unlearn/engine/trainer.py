"""The trainer: one request -> one adapter, on the model as the request finds it.

The UNet enters with the earlier requests folded into its K/V weights (so request 12 costs what request 1 costs)
and leaves with only the new, trained adapter attached; the caller puts the composed state back. The frozen model
is the same UNet with the new adapter disabled, never a copy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import reduce
from tqdm.auto import tqdm

from ..kv import adapters as ad
from ..families.registry import conditioner_for, denoiser_of
from .ledger import now
from ..objectives import ObjectiveContext, SolveContext, SolvedObjective, objective_class, objective_for
from ..regularizers import TrainingContext
from .request import UnlearnRequest
from .training_config import TrainingConfig

TRAINING_ADAPTER = "unlearn_training"


@dataclass
class TrainingResult:
    adapter: ad.RequestAdapter
    final_loss: float
    seconds: float
    timing: dict[str, float]  # setup (adapter, trajectories, regularizer setup) and the step loop, in seconds
    reports: list[dict[str, Any]]
    # when training ended (UTC, ISO seconds): the record's created_at, taken here so that every process that
    # receives a gathered result writes the same ledger
    finished_at: str = dataclasses.field(default_factory=now)
    steps: int | None = None  # optimizer steps taken (None: training.steps); 0 for a solved method


def train_request(
    pipe: Any,
    request: UnlearnRequest,
    *,
    base_weights: dict[str, torch.Tensor],
    start_offsets: dict[str, torch.Tensor] | None,
    earlier: list,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    data_parallel: bool = True,
) -> TrainingResult:
    """Train ``request``'s adapter on the pipeline's denoiser (whose K/V weights already hold the start model).

    Leaves the training adapter attached; the caller rebuilds the composed state (also on failure).
    With ``data_parallel`` (the default) every process of ``accelerator`` trains this same request on its slice of
    the global batch and gradients are averaged; without it each process trains on its own (merge requests).
    """
    method_class = objective_class(request.method)
    if issubclass(method_class, SolvedObjective):  # solved, not trained: no adapter, loop or accelerator
        return _solve(method_class(request.method), SolveContext(
            pipe=pipe, concept=request.concept, domain=request.domain, prompts=request.prompts,
            base_weights=base_weights, start_offsets=start_offsets, earlier=earlier, seed=request.seed,
            progress=progress, concepts=request.concepts))
    denoiser = denoiser_of(pipe)  # the UNet or the transformer
    training = request.training
    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(training)
    shard = (accelerator.process_index, accelerator.num_processes) if data_parallel else (0, 1)
    if training.batch_size % shard[1]:
        raise ValueError(
            f"batch_size {training.batch_size} must be a multiple of the {accelerator.num_processes} processes: "
            "each process trains on an equal share of the global batch"
        )
    kind = "dense" if any(r.adapter_kind == "dense" for r in request.regularizers) else "lora"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(request.seed)  # peft's LoRA init draws from the global RNG; same seed -> same init everywhere
        adapter = ad.TrainableAdapter(
            denoiser, TRAINING_ADAPTER, kind, training.rank, training.lora_alpha, training.init_lora_weights
        )
    ad.activate(denoiser, [adapter.name], adapter.parameters)
    checkpointing_was = bool(getattr(denoiser, "is_gradient_checkpointing", False))
    if training.gradient_checkpointing and not checkpointing_was:
        denoiser.enable_gradient_checkpointing()
    try:
        return _train(pipe, request, adapter, accelerator, shard, started, base_weights=base_weights,
                      start_offsets=start_offsets, earlier=earlier, progress=progress)
    finally:
        if training.gradient_checkpointing and not checkpointing_was:
            denoiser.disable_gradient_checkpointing()


def _solve(objective: SolvedObjective, context: SolveContext) -> TrainingResult:
    """A solved method's request: its artifact, and its report kept under the method's name."""
    started = time.perf_counter()
    adapter, report = objective.solve(context)
    seconds = time.perf_counter() - started
    return TrainingResult(adapter=adapter, final_loss=0.0, seconds=seconds, timing={"solve_seconds": round(seconds, 4)},
                          reports=[{"name": objective.config.method, "report": report}], steps=0)


def _train(pipe: Any, request: UnlearnRequest, adapter: ad.TrainableAdapter, accelerator: Accelerator,
           shard: tuple[int, int], started: float, *, base_weights: dict[str, torch.Tensor],
           start_offsets: dict[str, torch.Tensor] | None, earlier: list, progress: bool) -> TrainingResult:
    denoiser, training, regularizers, concept = denoiser_of(pipe), request.training, request.regularizers, request.concept
    generator = torch.Generator().manual_seed(request.seed)  # the same draws in every process: the global batch
    objective = objective_for(
        request.method,
        ObjectiveContext(
            pipe=pipe,
            conditioner=conditioner_for(pipe, guidance_scale=getattr(request.method, "guidance_scale", None)),
            denoiser=denoiser,
            concept=concept,
            prompts=request.prompts,
            frozen=lambda: ad.adapters_disabled(denoiser, adapter.parameters),
            generator=generator,
            templates=request.templates,
            progress=progress and accelerator.is_local_main_process,
            concepts=request.concepts,
        ),
    )
    with accelerator.autocast():
        objective.prepare()
    trajectories_done = time.perf_counter()
    with accelerator.autocast():
        # Every frozen target the loop will need, in large no-grad batches now rather than one pass per step.
        targets = objective.precompute_targets(training.steps * training.gradient_accumulation_steps,
                                               training.batch_size, shard,
                                               progress=progress and accelerator.is_local_main_process)
    targets_done = time.perf_counter()
    ctx = TrainingContext(
        pipe=pipe,
        denoiser=denoiser,
        adapter=adapter,
        objective=objective,
        concept=concept,
        domain=request.domain,
        earlier=earlier,
        base_weights=base_weights,
        start_offsets=start_offsets,
        progress=progress and accelerator.is_local_main_process,
        concepts=request.concepts,
    )
    for regularizer in regularizers:
        with accelerator.autocast():
            regularizer.setup(ctx)

    # The optimizer goes through accelerate for fp16 loss scaling; gradients are averaged over processes by hand
    # (the UNet is not wrapped in DDP: its frozen passes and adapter toggles would trip DDP's bookkeeping).
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(adapter.parameters, lr=training.learning_rate, weight_decay=0.0), device_placement=False
    )
    accumulation = training.gradient_accumulation_steps
    loop_started = time.perf_counter()
    show = progress and accelerator.is_local_main_process
    bar = tqdm(range(training.steps), desc=f"unlearning {concept!r}", disable=not show, leave=False)
    loss_value = float("nan")
    for step in bar:
        ctx.step = step
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accumulation):
            with accelerator.autocast():
                loss = objective.training_loss(training.batch_size, shard=shard)
                for regularizer in regularizers:
                    extra = regularizer.loss(ctx)
                    if extra is not None:
                        loss = loss + extra
            _check_finite_loss(loss, step, concept)
            accelerator.backward(loss / accumulation)
            total += float(loss.detach()) / accumulation
        # Regularizers see the synchronised, unscaled gradient, so every process applies the same update.
        if shard[1] > 1:
            average_gradients(adapter.parameters, accelerator)
        accelerator.unscale_gradients()
        apply_masks_to_gradients(adapter)
        for regularizer in regularizers:
            regularizer.transform_gradients(ctx)
        if training.mixed_precision != "fp16":  # fp16's loss scaler skips overflowing steps on its own
            _check_finite_tensors((p.grad for p in adapter.parameters), "gradients", step, concept)
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(adapter.parameters, training.max_grad_norm)
        optimizer.step()
        apply_masks_to_parameters(adapter)
        _check_finite_tensors(adapter.parameters, "adapter weights", step, concept)
        for regularizer in regularizers:
            regularizer.after_step(ctx)
        loss_value = _mean_over_processes(total, accelerator) if shard[1] > 1 else total
        if show:
            bar.set_postfix(loss=f"{loss_value:.4g}")
    bar.close()
    finished = time.perf_counter()
    return TrainingResult(
        adapter=adapter.to_artifact(),
        final_loss=loss_value,
        seconds=finished - started,
        timing={
            "setup_seconds": round(loop_started - started, 4),
            "trajectory_seconds": round(trajectories_done - started, 4),  # adapter and trajectories
            "target_seconds": round(targets_done - trajectories_done, 4),
            "frozen_targets": targets,
            "regularizer_setup_seconds": round(loop_started - targets_done, 4),
            "loop_seconds": round(finished - loop_started, 4),
            "seconds_per_step": round((finished - loop_started) / training.steps, 6),
            "processes": shard[1],
        },
        reports=[{**r.to_dict(), "report": r.report()} for r in regularizers],
    )


def _check_finite_loss(loss: torch.Tensor, step: int, concept: str) -> None:
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(
            f"unlearning {concept!r}: the loss became {float(loss.detach())} at step {step + 1}; the request was "
            "stopped and nothing was committed. Lower the learning rate or the regularizer weights."
        )


def _check_finite_tensors(tensors: Any, what: str, step: int, concept: str) -> None:
    """A NaN or Inf would be trained into the adapter and poison every image: stop the request instead."""
    # One reduction and one host sync per step: the sum of a tensor holding a NaN or Inf is not finite.
    sums = [tensor.detach().float().sum() for tensor in tensors if tensor is not None]
    if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
        raise FloatingPointError(
            f"unlearning {concept!r}: the {what} became non-finite (NaN or Inf) at step {step + 1}; the request "
            "was stopped and nothing was committed. Lower the learning rate or the regularizer weights."
        )


def make_accelerator(training: TrainingConfig) -> Accelerator:
    """An ``Accelerator`` for one request (accelerate's process-wide state is created once and shared)."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", training.mixed_precision) != training.mixed_precision:
        raise ValueError(
            f"accelerate is already set up in this process with mixed_precision={state['_mixed_precision']!r}; "
            f"the request asks for {training.mixed_precision!r}. Use one setting per process, or pass "
            "accelerator=... to unlearn()"
        )
    return Accelerator(mixed_precision=training.mixed_precision)


def average_gradients(parameters: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce (mean) the adapter gradients across processes, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    offset = 0
    for param, grad in zip(parameters, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


def _mean_over_processes(value: float, accelerator: Accelerator) -> float:
    return float(reduce(torch.tensor([value], device=accelerator.device), reduction="mean"))


def apply_masks_to_gradients(adapter: ad.TrainableAdapter) -> None:
    """The parameter-mask hook: masked-out elements get no gradient."""
    if adapter.masks is None:
        return
    for layer, mask in adapter.masks.items():
        grad = adapter.input_factor(layer).grad
        if grad is not None:
            grad.mul_(mask)


@torch.no_grad()
def apply_masks_to_parameters(adapter: ad.TrainableAdapter) -> None:
    """Keep masked-out elements exactly zero whatever the optimizer does."""
    if adapter.masks is None:
        return
    for layer, mask in adapter.masks.items():
        adapter.input_factor(layer).mul_(mask)
