"""Composition: put a chosen set of requests into the UNet, stacked as peft adapters or folded into the weights.

The UNet's K/V state is always rebuilt from the same inputs (the base K/V weights, the request artifacts, the
active list, the mode and the strategy), never patched incrementally, so any state (audit, rollback, unfold, an
interrupted request) can be reached again bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import adapters as ad
from .merging import MergeStrategy

Mode = Literal["stacked", "folded"]
MERGED_ADAPTER = "merged"


def combined_deltas(
    requests: list[ad.RequestAdapter], strategy: str | MergeStrategy
) -> dict[str, torch.Tensor] | None:
    """Per-layer total change of ``requests`` under ``strategy`` (sum, or merge); None when there are none."""
    if not requests:
        return None
    layers = requests[0].layers
    if isinstance(strategy, MergeStrategy):
        return {layer: strategy.combine([r.delta(layer) for r in requests]) for layer in layers}
    total = {}
    for layer in layers:
        acc = requests[0].delta(layer).clone()
        for request in requests[1:]:
            acc += request.delta(layer)
        total[layer] = acc
    return total


def set_kv_weights(unet: torch.nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor] | None) -> None:
    """K/V weights := base (+ deltas, added in float32 and cast to the weight's dtype)."""
    with torch.no_grad():
        for name, weight in base.items():
            target = ad.kv_linear(unet, name).weight
            if deltas is None:
                target.copy_(weight)
            else:
                target.copy_(weight.float() + deltas[name].to(weight.device))


def materialize(
    unet: torch.nn.Module,
    base: dict[str, torch.Tensor],
    requests: list[tuple[str, ad.RequestAdapter]],
    mode: Mode,
    strategy: str | MergeStrategy,
) -> None:
    """Rebuild the UNet's K/V state for the active ``requests`` (in ledger order).

    * folded: plain ``nn.Linear`` layers holding base + the combined delta.
    * stacked, sequential: one peft adapter per request, all active, summed in ledger order.
    * stacked, merge: one adapter holding the merged delta (or the single request's own adapter).
    """
    ad.remove_all(unet)
    artifacts = [artifact for _, artifact in requests]
    if mode == "folded":
        set_kv_weights(unet, base, combined_deltas(artifacts, strategy))
        return
    set_kv_weights(unet, base, None)
    if isinstance(strategy, MergeStrategy) and len(requests) > 1:
        merged = ad.RequestAdapter.from_dense(combined_deltas(artifacts, strategy))
        requests = [(MERGED_ADAPTER, merged)]
    names = []
    for request_id, artifact in requests:
        name = ad.adapter_name(request_id)
        ad.install(unet, name, artifact)
        names.append(name)
    ad.activate(unet, names)
