"""Composition: put a chosen set of requests into the UNet, stacked as a peft adapter or folded into the weights.

The UNet's K/V state is always rebuilt from the same inputs (the base K/V weights, the request artifacts, the
active list, the mode and the strategy), never patched incrementally, so any state (audit, rollback, unfold, an
interrupted request) can be reached again bit for bit.

Stacked requests share ONE peft adapter whose factors are the requests' factors side by side
(A = [A_1; A_2; ...], B = [B_1 s_1, B_2 s_2, ...]), so B @ A is the sum of the requests' deltas: one LoRA branch
per K/V layer however many requests are active, instead of one branch (and its kernel launches) per request.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import adapters as ad
from .merging import MergeStrategy

Mode = Literal["stacked", "folded"]
MERGED_ADAPTER = "merged"
STACK_ADAPTER = "stack"


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


def set_kv_weights(denoiser: torch.nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor] | None) -> None:
    """K/V weights := base (+ deltas, added in float32 and cast to the weight's dtype)."""
    with torch.no_grad():
        for name, weight in base.items():
            target = ad.kv_linear(denoiser, name).weight
            if deltas is None:
                target.copy_(weight)
            else:
                target.copy_(weight.float() + deltas[name].to(weight.device))


def materialize(
    denoiser: torch.nn.Module,
    base: dict[str, torch.Tensor],
    requests: list[tuple[str, ad.RequestAdapter]],
    mode: Mode,
    strategy: str | MergeStrategy,
) -> None:
    """Rebuild the UNet's K/V state for the active ``requests`` (in ledger order).

    * folded: plain ``nn.Linear`` layers holding base + the combined delta.
    * stacked, sequential: the peft adapter ``unlearn_stack`` holding every request side by side.
    * stacked, merge: the adapter ``unlearn_merged`` holding the merged delta (a single request: ``unlearn_stack``).

    The new state is computed and checked (finite values only) before the UNet is touched, so a refused state
    leaves the UNet as it was.
    """
    artifacts = [artifact for _, artifact in requests]
    deltas, name, adapter = None, None, None
    if mode == "folded":
        deltas = combined_deltas(artifacts, strategy)
        check_finite(deltas or {}, [request_id for request_id, _ in requests])
    elif artifacts:
        if isinstance(strategy, MergeStrategy) and len(artifacts) > 1:
            name, adapter = MERGED_ADAPTER, ad.RequestAdapter.from_dense(combined_deltas(artifacts, strategy))
        else:
            name, adapter = STACK_ADAPTER, stack(artifacts)
        check_finite(adapter.tensors, [request_id for request_id, _ in requests])
    ad.remove_all(denoiser)
    set_kv_weights(denoiser, base, deltas)
    if adapter is not None:
        ad.install(denoiser, ad.adapter_name(name), adapter)
        ad.activate(denoiser, [ad.adapter_name(name)])


def check_finite(tensors: dict[str, torch.Tensor], request_ids: list[str]) -> None:
    """Refuse a NaN or Inf before it reaches the UNet's weights, where it would poison every image."""
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(
                f"the combined change of requests {request_ids} holds non-finite values (NaN or Inf) at {key}; "
                "the UNet was left as it was"
            )


def stack(artifacts: list[ad.RequestAdapter]) -> ad.RequestAdapter:
    """One LoRA equal to the sum of ``artifacts``: their factors side by side, scales folded into B.

    Dense deltas are summed (in order) into one identity-factor block. A single LoRA request keeps its own
    factors and scale, so stacking it changes nothing.
    """
    if len(artifacts) == 1 and artifacts[0].kind == "lora":
        return artifacts[0]
    tensors, scales = {}, {}
    for layer in artifacts[0].layers:
        a_parts, b_parts, dense = [], [], None
        for artifact in artifacts:
            if artifact.dense_layer(layer):
                delta = artifact.delta(layer)
                dense = delta.clone() if dense is None else dense + delta
            else:
                a, b, scale = artifact.lora_factors(layer)
                a_parts.append(a)
                b_parts.append(b * scale)
        if dense is not None:
            a, b = ad.identity_factors(dense)
            a_parts.append(a)
            b_parts.append(b)
        tensors[f"{layer}.lora_A"] = torch.cat(a_parts, dim=0)
        tensors[f"{layer}.lora_B"] = torch.cat(b_parts, dim=1)
        scales[layer] = 1.0
    return ad.RequestAdapter("lora", tensors, scales)
