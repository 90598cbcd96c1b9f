"""Selective fine-tuning: only the globally most important K/V elements may change.

Importance of an element is |theta * g|, g the gradient of the request's own erasure loss summed over every step of
the frozen model's cached sampling trajectories; the top ``top_k`` fraction over all K/V layers together is kept and
the request's adapter becomes a dense delta masked to those elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from .._validation import check_number
from ..kv.adapters import kv_linear
from .base import Regularizer, TrainingContext, register_regularizer


def importance_scores(ctx: TrainingContext) -> dict[str, torch.Tensor]:
    """|theta * g| per K/V element, for the model the request starts from.

    The request's dense delta D is zero at this point and enters the layer as (W + D) x, so dL/dW == dL/dD: the
    gradient is accumulated on D (already trainable) instead of unfreezing the base weights.
    """
    adapter = ctx.adapter
    if adapter.kind != "dense":
        raise ValueError("importance scores need the dense adapter that SelectiveFinetune asks for")
    params = {layer: adapter.input_factor(layer) for layer in adapter.layer_names}
    for param in params.values():
        param.grad = None
    steps = getattr(ctx.objective.config, "sampling_steps", None)  # one loss per step of the cached trajectories
    for loss in tqdm(ctx.objective.trajectory_losses(), total=steps, desc="selective fine-tuning: importance scores",
                     unit="step", disable=not ctx.progress, leave=False):
        loss.backward()
    scores = {}
    for layer, param in params.items():
        theta = kv_linear(ctx.denoiser, layer).weight.detach().float()
        scores[layer] = (theta * param.grad.float()).abs()
        param.grad = None
    return scores


def top_fraction_masks(scores: dict[str, torch.Tensor], fraction: float) -> tuple[dict[str, torch.Tensor], float]:
    """Boolean masks keeping the global top ``fraction`` of all scores (at least one element); and the cut-off."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = max(1, int(fraction * flat.numel()))
    top = torch.topk(flat, keep, sorted=False).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[top] = True
    masks, offset = {}, 0
    for layer, score in scores.items():
        masks[layer] = chosen[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks, float(flat[top].min())


@register_regularizer
@dataclass
class SelectiveFinetune(Regularizer):
    """Train only the globally most important K/V elements, so that the rest of the model cannot drift.

    Importance is ``|theta * grad|`` of the request's own erasure loss, accumulated over the frozen model's sampling
    trajectory; the top ``top_k`` fraction over all K/V layers together is kept and the request's adapter becomes a
    dense delta masked to those elements.

    Args:
        top_k: the fraction of elements that may change, in (0, 1]. The paper uses 0.05 for Concept Ablation, 0.4
            for ESD on SDXL and 0.3 together with gradient projection.

    Raises:
        ValueError: ``top_k`` outside (0, 1].
    """

    name: ClassVar[str] = "selective_finetune"
    order: ClassVar[int] = 0  # the mask must exist before projections are built inside it
    adapter_kind: ClassVar[str | None] = "dense"

    top_k: float = 0.05

    def __post_init__(self) -> None:
        check_number(self.top_k, "SelectiveFinetune top_k", minimum=0, maximum=1, exclusive_minimum=True)

    def setup(self, ctx: TrainingContext) -> None:
        """Score every K/V element and set the adapter's mask to the top ``top_k`` fraction.

        Args:
            ctx: the request being trained (its adapter must be dense).

        Raises:
            ValueError: the adapter is not dense.
        """
        scores = importance_scores(ctx)
        masks, cutoff = top_fraction_masks(scores, self.top_k)
        ctx.adapter.masks = {layer: m.to(ctx.adapter.input_factor(layer).dtype) for layer, m in masks.items()}
        total = sum(m.numel() for m in masks.values())
        kept = int(sum(int(m.sum()) for m in masks.values()))
        self._report = {"kept_elements": kept, "total_elements": total, "kept_fraction": kept / total,
                        "score_cutoff": cutoff}

    def report(self) -> dict[str, Any]:
        """``kept_elements``, ``total_elements``, ``kept_fraction`` and the ``score_cutoff`` of the mask."""
        return dict(self._report)
