"""The trainer: one request -> one adapter, on the model as the request finds it.

The UNet enters with the earlier requests folded into its K/V weights (so request 12 costs what request 1 costs)
and leaves with only the new, trained adapter attached; the caller puts the composed state back. The frozen model
is the same UNet with the new adapter disabled, never a copy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from . import adapters as ad
from .conditioning import TextConditioner
from .objectives import ObjectiveConfig, ObjectiveContext, objective_for
from .regularizers import Regularizer, TrainingContext

TRAINING_ADAPTER = "unlearn_training"


@dataclass
class TrainingConfig:
    """How one request is optimised.

    Args:
        steps: optimizer steps.
        learning_rate: AdamW learning rate of the adapter parameters.
        batch_size: (x_t, t) samples per step.
        rank: LoRA rank, or "full" (min(in, out) per layer). Ignored when a regularizer needs a dense delta.
        lora_alpha: LoRA alpha (default: the rank, i.e. scale 1).
        max_grad_norm: gradient clipping after the regularizers' transforms (None: no clipping).
        init_lora_weights: peft's LoRA init; False gives a non-zero adapter from the start (tests).
    """

    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 1
    rank: int | Literal["full"] = 4
    lora_alpha: float | None = None
    max_grad_norm: float | None = 1.0
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        def positive_int(field: str) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")

        positive_int("steps")
        positive_int("batch_size")
        if self.rank != "full":
            positive_int("rank")
        for field in ("learning_rate", "lora_alpha", "max_grad_norm"):
            value = getattr(self, field)
            if value is None and field != "learning_rate":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field} must be a number > 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainingResult:
    adapter: ad.RequestAdapter
    final_loss: float
    seconds: float
    timing: dict[str, float]  # setup (adapter, trajectories, regularizer setup) and the step loop, in seconds
    reports: list[dict[str, Any]]


def train_request(
    pipe: Any,
    *,
    concept: str,
    domain: str,
    prompts: list[str],
    templates: tuple[str, ...] | None,
    objective_config: ObjectiveConfig,
    regularizers: list[Regularizer],
    training: TrainingConfig,
    seed: int,
    base_weights: dict[str, torch.Tensor],
    start_offsets: dict[str, torch.Tensor] | None,
    earlier: list,
    progress: bool = True,
) -> TrainingResult:
    """Train one request's adapter on ``pipe.unet`` (whose K/V weights already hold the start model).

    Leaves the training adapter attached; the caller rebuilds the composed state (also on failure).
    """
    unet = pipe.unet
    started = time.perf_counter()
    kind = "dense" if any(r.adapter_kind == "dense" for r in regularizers) else "lora"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft's LoRA init draws from the global RNG
        adapter = ad.TrainableAdapter(
            unet, TRAINING_ADAPTER, kind, training.rank, training.lora_alpha, training.init_lora_weights
        )
    ad.activate(unet, [adapter.name], adapter.parameters)

    generator = torch.Generator().manual_seed(seed)
    objective = objective_for(
        objective_config,
        ObjectiveContext(
            pipe=pipe,
            conditioner=TextConditioner(pipe),
            unet=unet,
            concept=concept,
            prompts=prompts,
            frozen=lambda: ad.adapters_disabled(unet, adapter.parameters),
            generator=generator,
            templates=templates,
        ),
    )
    objective.prepare()
    ctx = TrainingContext(
        pipe=pipe,
        unet=unet,
        adapter=adapter,
        objective=objective,
        concept=concept,
        domain=domain,
        earlier=earlier,
        base_weights=base_weights,
        start_offsets=start_offsets,
    )
    for regularizer in regularizers:
        regularizer.setup(ctx)

    optimizer = torch.optim.AdamW(adapter.parameters, lr=training.learning_rate, weight_decay=0.0)
    loop_started = time.perf_counter()
    bar = tqdm(range(training.steps), desc=f"unlearning {concept!r}", disable=not progress, leave=False)
    loss_value = float("nan")
    for step in bar:
        ctx.step = step
        loss = objective.training_loss(training.batch_size)
        for regularizer in regularizers:
            extra = regularizer.loss(ctx)
            if extra is not None:
                loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_masks_to_gradients(adapter)
        for regularizer in regularizers:
            regularizer.transform_gradients(ctx)
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(adapter.parameters, training.max_grad_norm)
        optimizer.step()
        apply_masks_to_parameters(adapter)
        for regularizer in regularizers:
            regularizer.after_step(ctx)
        loss_value = float(loss.detach())
        if progress:
            bar.set_postfix(loss=f"{loss_value:.4g}")
    bar.close()
    finished = time.perf_counter()
    return TrainingResult(
        adapter=adapter.to_artifact(),
        final_loss=loss_value,
        seconds=finished - started,
        timing={
            "setup_seconds": round(loop_started - started, 4),
            "loop_seconds": round(finished - loop_started, 4),
            "seconds_per_step": round((finished - loop_started) / training.steps, 6),
        },
        reports=[{**r.to_dict(), "report": r.report()} for r in regularizers],
    )


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
