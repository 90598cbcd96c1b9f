"""Model merging as a composition strategy: requests trained independently from the base, deltas combined.

Uses ``peft.utils.merge_utils`` on the per-layer deltas. With one active request there is nothing to merge and the
request is used as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft.utils import merge_utils

from .._validation import check_number

MergeMethod = Literal["uniform", "task_arithmetic", "ties"]
MERGE_METHODS: tuple[str, ...] = ("uniform", "task_arithmetic", "ties")


@dataclass(frozen=True)
class MergeStrategy:
    """How the deltas of independently unlearned requests combine: ``pipe.unlearn(..., strategy=MergeStrategy())``.

    Each request is trained from the base, not on top of the ones before it, so requests do not compound; the
    merged delta is what the model holds.

    Args:
        method: "uniform" (mean), "task_arithmetic" (scale * sum) or "ties" (trim each delta to its top
            ``density`` fraction by magnitude per layer, elect the sign of the sum, disjoint mean, times scale).
        scale: lambda. Default: 1.0 for task arithmetic; for TIES it grows with the number n of merged requests,
            1.25 + 0.15 * (n - 2) (1.25 at 2, 2.75 at 12), as in the paper's tuned values.
        density: fraction of each delta TIES keeps (paper's grid: 0.2, 0.4, 0.6, 0.8).

    Raises:
        ValueError: an unknown method, a scale for ``"uniform"``, or a number out of range.

    Examples:
        >>> import torch
        >>> MergeStrategy("task_arithmetic", scale=0.5).combine([torch.ones(2), 3 * torch.ones(2)])
        tensor([2., 2.])
        >>> MergeStrategy("ties").scale_for(12)
        2.75
    """

    method: MergeMethod = "ties"
    scale: float | None = None
    density: float = 0.6

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; allowed: {list(MERGE_METHODS)}")
        if self.scale is not None:
            check_number(self.scale, "merge scale", minimum=0, exclusive_minimum=True)
            if self.method == "uniform":
                raise ValueError("merge method 'uniform' takes no scale (it is the mean); use 'task_arithmetic'")
        check_number(self.density, "merge density", minimum=0, maximum=1, exclusive_minimum=True)

    def scale_for(self, n: int) -> float:
        """The factor the combined delta is multiplied by (for ``"uniform"``: 1/n, the mean).

        Args:
            n: how many requests are merged.

        Returns:
            ``scale`` when given; else 1/n (uniform), 1.0 (task arithmetic) or ``1.25 + 0.15 * (n - 2)`` (TIES).
        """
        if self.method == "uniform":
            return 1.0 / n
        if self.scale is not None:
            return float(self.scale)
        return 1.0 if self.method == "task_arithmetic" else 1.25 + 0.15 * (n - 2)

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Merge one layer's deltas.

        Args:
            deltas: one delta per request, all the same shape.

        Returns:
            The merged delta (a single delta is returned as it is: nothing to merge).

        Raises:
            ValueError: ``deltas`` is empty.
        """
        if not deltas:
            raise ValueError("nothing to merge")
        if len(deltas) == 1:
            return deltas[0]
        n = len(deltas)
        ones = torch.ones(n, dtype=deltas[0].dtype)
        if self.method == "ties":
            return merge_utils.ties(deltas, ones, density=self.density) * self.scale_for(n)
        return merge_utils.task_arithmetic(deltas, ones * self.scale_for(n))

    def to_dict(self) -> dict[str, Any]:
        """``{"strategy": "merge", "method": ..., "scale": ..., "density": ...}``, as ledger records store it."""
        return {"strategy": "merge", **dataclasses.asdict(self)}


def resolve_strategy(strategy: str | MergeStrategy | None) -> str | MergeStrategy:
    """"sequential" (default), "merge" (TIES), a merge method name, or a ``MergeStrategy``."""
    if strategy is None or strategy == "sequential":
        return "sequential"
    if isinstance(strategy, MergeStrategy):
        return strategy
    if strategy == "merge":
        return MergeStrategy()
    if isinstance(strategy, str) and strategy in MERGE_METHODS:
        return MergeStrategy(method=strategy)
    raise ValueError(
        f"unknown strategy {strategy!r}; allowed: 'sequential', 'merge', {list(MERGE_METHODS)} or a MergeStrategy"
    )


def strategy_to_dict(strategy: str | MergeStrategy) -> dict[str, Any]:
    return strategy.to_dict() if isinstance(strategy, MergeStrategy) else {"strategy": "sequential"}


def strategy_from_dict(data: dict[str, Any]) -> str | MergeStrategy:
    """The strategy a ledger record names; anything but "sequential" or a valid merge is refused."""
    if not isinstance(data, dict):
        raise TypeError(f"a strategy record is a map, got {data!r}")
    kind = data.get("strategy", "sequential")
    settings = {k: v for k, v in data.items() if k != "strategy"}
    if kind == "sequential":
        if settings:
            raise ValueError(f"the sequential strategy takes no settings, got {sorted(settings)}")
        return "sequential"
    if kind != "merge":
        raise ValueError(f"unknown strategy {kind!r}; allowed: 'sequential', 'merge'")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(MergeStrategy)})
    if unknown:
        raise ValueError(f"unknown merge setting(s) {unknown}; allowed: {[f.name for f in dataclasses.fields(MergeStrategy)]}")
    return MergeStrategy(**settings)
