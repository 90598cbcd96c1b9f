"""L1 / L2 drift penalties: weight * mean(|dW|) or weight * mean(dW^2) over every trainable K/V element.

dW is the request's effective weight change (for a LoRA: B @ A * scale, not the factors), measured from the model
the request started from, or from the original base (``reference="base"``, adding earlier requests' change).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .._validation import check_number
from .base import Regularizer, TrainingContext, register_regularizer

REFERENCES = ("previous", "base")


@dataclass
class _DriftPenalty(Regularizer):
    """A penalty on the request's weight change: ``weight`` times the mean of ``penalty(dW)`` over every K/V element."""

    weight: float = 1.0
    reference: Literal["previous", "base"] = "previous"

    order: ClassVar[int] = 50
    # The elementwise penalty of a weight change, summed over every K/V element (set by each kind).
    penalty: ClassVar[Callable[[torch.Tensor], torch.Tensor]]

    def __post_init__(self) -> None:
        check_number(self.weight, f"{type(self).__name__} weight", minimum=0)
        if self.reference not in REFERENCES:
            raise ValueError(f"{type(self).__name__} reference must be one of {list(REFERENCES)}, got {self.reference!r}")

    def setup(self, ctx: TrainingContext) -> None:
        """Note where dW is measured from (with ``reference="base"``: the earlier requests' offsets).

        Args:
            ctx: the request being trained.
        """
        self._offsets = ctx.start_offsets if self.reference == "base" else None
        self._count = sum(ad_weight.numel() for ad_weight in ctx.base_weights.values())
        self._last: float | None = None

    def drift(self, ctx: TrainingContext) -> torch.Tensor:
        """The mean elementwise penalty of dW over every K/V element (before ``weight``).

        Args:
            ctx: the request being trained.

        Returns:
            A scalar tensor, differentiable in the adapter's parameters.
        """
        total = None
        for layer in ctx.adapter.layer_names:
            delta = ctx.adapter.delta(layer)
            if self._offsets is not None:
                delta = delta + self._offsets[layer].to(delta.device)
            term = self.penalty(delta).sum()
            total = term if total is None else total + term
        return total / self._count

    def loss(self, ctx: TrainingContext) -> torch.Tensor | None:
        """``weight * drift(ctx)``, the term added to the objective's loss.

        Args:
            ctx: the request being trained.

        Returns:
            A scalar tensor.
        """
        value = self.drift(ctx)
        self._last = float(value.detach())
        return self.weight * value

    def report(self) -> dict[str, Any]:
        """``{"final_drift": ...}``: the last step's drift (before ``weight``), None if no step ran."""
        return {"final_drift": self._last}


@register_regularizer
@dataclass
class L1Drift(_DriftPenalty):
    """Bounds drift across requests by adding ``weight * mean(|dW|)`` to the loss.

    dW is the request's effective weight change (for a LoRA: ``B @ A * scale``), over every K/V element.

    Args:
        weight: lambda, >= 0. The paper's scripts use about 10-100 (Concept Ablation, SD 1.5).
        reference: ``"previous"`` measures dW from the model the request starts from; ``"base"`` from the original
            base, so earlier requests' change counts too.

    Raises:
        ValueError: a negative or non-finite weight, or another reference.
    """

    name: ClassVar[str] = "l1_drift"
    weight: float = 10.0
    penalty = staticmethod(torch.abs)


@register_regularizer
@dataclass
class L2Drift(_DriftPenalty):
    """Bounds drift across requests by adding ``weight * mean(dW^2)`` to the loss.

    dW is the request's effective weight change (for a LoRA: ``B @ A * scale``), over every K/V element.

    Args:
        weight: lambda, >= 0. The paper's scripts use about 2.5e4 (Concept Ablation, SD 1.5).
        reference: ``"previous"`` measures dW from the model the request starts from; ``"base"`` from the original
            base, so earlier requests' change counts too.

    Raises:
        ValueError: a negative or non-finite weight, or another reference.

    Examples:
        >>> L2Drift(weight=1e3).to_dict()
        {'name': 'l2_drift', 'weight': 1000.0, 'reference': 'previous'}
    """

    name: ClassVar[str] = "l2_drift"
    weight: float = 2.5e4
    penalty = staticmethod(torch.square)
