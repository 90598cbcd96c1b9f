"""Request adapters on the K/V projections that read the text, as peft LoRA layers.

Which layers those are depends on the model family (``families/registry.py``): ``attn2.to_k`` / ``attn2.to_v`` in a UNet,
the text-stream ``attn.add_k_proj`` / ``attn.add_v_proj`` of SD3's and Flux's joint blocks.

Two kinds of artifact, one mechanism:

* ``lora``: factors A [r, in], B [out, r] and a scale per layer; delta = B @ A * scale (peft's ``get_delta_weight``).
* ``dense``: a (masked) full delta D [out, in] per layer, as selective fine-tuning produces. In the UNet it is a
  peft LoRA of rank min(in, out) with an identity factor (A = I, B = D or A = D, B = I, scale 1), which represents D
  exactly, so stacking, audit, export and folding treat both kinds alike.

A ``lora`` artifact may also store some layers as a dense delta (``"{layer}.delta"``, scale 1): whichever of the
two forms is smaller for that layer (``smaller_form``), as the closed form does; ``dense_layer`` says which.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from ..families.registry import family_of_denoiser

KV_SUFFIXES = ("attn2.to_k", "attn2.to_v")  # the UNet family's; see ``kv_suffixes`` for any denoiser
ADAPTER_PREFIX = "unlearn_"
AdapterKind = Literal["lora", "dense"]


def kv_suffixes(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """Module-name endings of the text K/V layers of ``denoiser``'s family (none for an unknown denoiser)."""
    family = family_of_denoiser(denoiser)
    return family.kv_suffixes if family is not None else ()


def kv_module_names(denoiser: torch.nn.Module) -> list[str]:
    """Names of every K/V projection that reads the text, in module order (``denoiser``: any supported denoiser)."""
    suffixes = kv_suffixes(denoiser)
    if not suffixes:
        return []
    names = [
        name
        for name, module in denoiser.named_modules()
        if name.endswith(suffixes) and (isinstance(module, torch.nn.Linear) or isinstance(module, LoraLayer))
    ]
    return names


def kv_linear(denoiser: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The plain ``nn.Linear`` at ``name`` (inside its peft wrapper when one is there)."""
    module = denoiser.get_submodule(name)
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def kv_weights(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: kv_linear(denoiser, name).weight for name in kv_module_names(denoiser)}


def adapter_name(request_id: str) -> str:
    return f"{ADAPTER_PREFIX}{request_id}"


def lora_modules(denoiser: torch.nn.Module, names: Iterable[str]) -> dict[str, LoraLayer]:
    return {name: denoiser.get_submodule(name) for name in names}


@dataclass
class RequestAdapter:
    """One request's change to the K/V weights, on the CPU in float32: what the ledger stores per request.

    Both kinds are applied through peft LoRA layers (a dense delta with an identity factor), so stacking, audit,
    export and folding treat them alike.

    Args:
        kind: ``"lora"`` (low-rank factors, what trained methods and the closed form produce) or ``"dense"`` (a
            full, possibly masked delta, what selective fine-tuning produces).
        tensors: ``"{layer}.lora_A"`` [r, in] and ``"{layer}.lora_B"`` [out, r] per layer (kind ``"lora"``; a layer
            whose delta is smaller than its factors may hold ``"{layer}.delta"`` instead, scale 1), or
            ``"{layer}.delta"`` [out, in] (kind ``"dense"``).
        scales: the LoRA scale (alpha / r) per layer; dense deltas need none.

    Examples:
        >>> import torch
        >>> adapter = RequestAdapter.from_dense({"down.attn2.to_k": torch.ones(2, 3)})
        >>> adapter.layers
        ['down.attn2.to_k']
        >>> a, b, scale = adapter.lora_factors("down.attn2.to_k")
        >>> bool(torch.equal(b @ a * scale, adapter.delta("down.attn2.to_k")))
        True
    """

    kind: AdapterKind
    tensors: dict[str, torch.Tensor]
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The module names of the layers the request changes, in stored order."""
        suffixes = (".delta",) if self.kind == "dense" else (".lora_A", ".delta")
        names = (key.rpartition(".")[0] for key in self.tensors if key.endswith(suffixes))
        return list(dict.fromkeys(names))

    def dense_layer(self, layer: str) -> bool:
        """Whether ``layer``'s change is stored as a dense delta (every layer of a ``"dense"`` artifact, the layers a
        ``"lora"`` artifact stores in that smaller form).

        Args:
            layer: the K/V module's name, one of :attr:`layers`.

        Returns:
            True when the artifact holds ``"{layer}.delta"``.
        """
        return f"{layer}.delta" in self.tensors

    def stored_bytes(self) -> int:
        """The bytes of every stored tensor (what the ledger's adapter file holds, less its small header).

        Returns:
            The sum of each tensor's element count times its element size.
        """
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def delta(self, layer: str) -> torch.Tensor:
        """The effective weight change of one layer.

        Args:
            layer: the K/V module's name, one of :attr:`layers`.

        Returns:
            ``B @ A * scale`` (kind ``"lora"``) or the stored delta (kind ``"dense"``), [out, in] float32.

        Raises:
            KeyError: the request does not change that layer.
        """
        if self.dense_layer(layer):
            return self.tensors[f"{layer}.delta"]
        a, b = self.tensors[f"{layer}.lora_A"], self.tensors[f"{layer}.lora_B"]
        return (b @ a) * self.scales[layer]

    def deltas(self) -> dict[str, torch.Tensor]:
        """Every layer's effective weight change (:meth:`delta`), by module name."""
        return {layer: self.delta(layer) for layer in self.layers}

    def lora_factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """LoRA factors that reproduce one layer's change exactly, for peft layers and LoRA export.

        Args:
            layer: the K/V module's name, one of :attr:`layers`.

        Returns:
            ``(A, B, scale)`` with ``B @ A * scale == delta`` exactly: a dense delta gets an identity factor (rank
            min(out, in), scale 1).

        Raises:
            KeyError: the request does not change that layer.
        """
        if not self.dense_layer(layer):
            return self.tensors[f"{layer}.lora_A"], self.tensors[f"{layer}.lora_B"], self.scales[layer]
        return (*identity_factors(self.tensors[f"{layer}.delta"]), 1.0)

    @classmethod
    def from_dense(cls, deltas: dict[str, torch.Tensor]) -> RequestAdapter:
        """A ``"dense"`` adapter holding the given deltas, detached, float32, on the CPU.

        Args:
            deltas: the full change [out, in] of each layer, by module name.

        Returns:
            The adapter.
        """
        return cls("dense", {f"{k}.delta": v.detach().float().cpu().contiguous() for k, v in deltas.items()})


def smaller_form(rank: int, out_features: int, in_features: int) -> str:
    """Which stored form of one layer's change holds fewer numbers: ``"lora"`` (factors, rank x (out + in)) or
    ``"dense"`` (the delta, out x in); ``"lora"`` on a tie.

    Args:
        rank: the rank of the factors.
        out_features: the layer's output width.
        in_features: the layer's input width.

    Returns:
        ``"lora"`` or ``"dense"``.
    """
    return "lora" if rank * (out_features + in_features) <= out_features * in_features else "dense"


def identity_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A == delta exactly, rank min(out, in): one factor is the identity."""
    out_features, in_features = delta.shape
    if in_features <= out_features:
        return torch.eye(in_features, dtype=delta.dtype), delta
    return delta, torch.eye(out_features, dtype=delta.dtype)


def _config(ranks: dict[str, int], alphas: dict[str, float], init: bool | str = True) -> LoraConfig:
    first = next(iter(ranks))
    return LoraConfig(
        r=ranks[first],
        lora_alpha=alphas[first],
        target_modules=list(ranks),  # full module names: exactly the K/V layers, whatever the family
        rank_pattern=dict(ranks),
        alpha_pattern=dict(alphas),
        init_lora_weights=init,
    )


def add_lora(
    denoiser: torch.nn.Module,
    name: str,
    ranks: dict[str, int],
    alphas: dict[str, float],
    init: bool | str = True,
) -> dict[str, LoraLayer]:
    """Add a peft LoRA adapter on the K/V layers (float32 factors) and return its layers by module name."""
    with warnings.catch_warnings():  # several adapters on one model is the point here, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        denoiser.add_adapter(_config(ranks, alphas, init), adapter_name=name)
    layers = lora_modules(denoiser, ranks)
    for layer in layers.values():
        layer.lora_A[name].float()
        layer.lora_B[name].float()
    return layers


def install(denoiser: torch.nn.Module, name: str, adapter: RequestAdapter) -> None:
    """Put ``adapter`` into the UNet as the peft adapter ``name`` (factors copied exactly)."""
    factors = {layer: adapter.lora_factors(layer) for layer in adapter.layers}
    ranks = {layer: a.shape[0] for layer, (a, _, _) in factors.items()}
    # alpha = scale * r reproduces the scale; identity factors have scale 1 (alpha = r).
    alphas = {layer: scale * ranks[layer] for layer, (_, _, scale) in factors.items()}
    layers = add_lora(denoiser, name, ranks, alphas)
    with torch.no_grad():
        for layer_name, (a, b, scale) in factors.items():
            layer = layers[layer_name]
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
            layer.scaling[name] = scale


def remove_all(denoiser: torch.nn.Module) -> None:
    """Drop every peft layer from the UNet, leaving plain ``nn.Linear`` modules (their weights untouched)."""
    if getattr(denoiser, "_hf_peft_config_loaded", False) or any(isinstance(m, LoraLayer) for m in denoiser.modules()):
        denoiser.unload_lora()


def freeze_adapters(denoiser: torch.nn.Module, trainable: Iterable[torch.nn.Parameter] = ()) -> None:
    """peft's set_adapter/enable_adapters mark adapters trainable again: freeze all but ``trainable``."""
    keep = {id(p) for p in trainable}
    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            for param in module.parameters():
                param.requires_grad_(id(param) in keep)


def activate(denoiser: torch.nn.Module, names: list[str], trainable: Iterable[torch.nn.Parameter] = ()) -> None:
    """Make exactly ``names`` active (in that order, which is the order peft sums them) and freeze the rest."""
    trainable = list(trainable)
    if names:
        denoiser.enable_adapters()
        denoiser.set_adapters(names)
    elif getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.disable_adapters()
    freeze_adapters(denoiser, trainable)


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module, trainable: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Run the UNet without its adapters (the frozen model); restore them and their trainability after."""
    trainable = list(trainable)
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()
        freeze_adapters(denoiser, trainable)


class TrainableAdapter:
    """The adapter of the request being trained: a peft LoRA (kind "lora") or an identity-factor LoRA whose one
    trainable factor is the dense delta (kind "dense").

    ``input_factor(layer)`` is the parameter whose rows live in the layer's input space (A for a LoRA, D for a
    dense delta): delta @ c == 0 for every c that all its rows are orthogonal to. ``masks`` (dense only) says
    which elements of D may change.
    """

    def __init__(
        self,
        denoiser: torch.nn.Module,
        name: str,
        kind: AdapterKind,
        rank: int | Literal["full"] = 4,
        alpha: float | None = None,
        init: bool | str = True,
    ):
        self.denoiser, self.name, self.kind = denoiser, name, kind
        shapes = {n: tuple(kv_linear(denoiser, n).weight.shape) for n in kv_module_names(denoiser)}
        self.masks: dict[str, torch.Tensor] | None = None
        if kind == "dense":
            ranks = {n: min(shape) for n, shape in shapes.items()}
            self.layers = add_lora(denoiser, name, ranks, {n: float(r) for n, r in ranks.items()})
            with torch.no_grad():
                for n, layer in self.layers.items():
                    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                    delta_is_b = shapes[n][1] <= shapes[n][0]
                    (a if delta_is_b else b).copy_(torch.eye(ranks[n]))
                    (b if delta_is_b else a).zero_()
                    layer.scaling[name] = 1.0
            self._delta_params = {
                n: (layer.lora_B[name].weight if shapes[n][1] <= shapes[n][0] else layer.lora_A[name].weight)
                for n, layer in self.layers.items()
            }
            self.parameters = list(self._delta_params.values())
        else:
            ranks = {n: (min(shape) if rank == "full" else int(rank)) for n, shape in shapes.items()}
            alphas = {n: float(r if alpha is None else alpha) for n, r in ranks.items()}
            self.layers = add_lora(denoiser, name, ranks, alphas, init=init)
            self.parameters = [
                p for layer in self.layers.values() for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)
            ]
        for param in self.parameters:
            param.requires_grad_(True)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def input_factor(self, layer: str) -> torch.nn.Parameter:
        if self.kind == "dense":
            return self._delta_params[layer]
        return self.layers[layer].lora_A[self.name].weight

    def delta(self, layer: str) -> torch.Tensor:
        """The layer's weight change, differentiable (B @ A * scale for a LoRA, D for a dense delta)."""
        if self.kind == "dense":
            return self._delta_params[layer]
        lora = self.layers[layer]
        return lora.lora_B[self.name].weight @ lora.lora_A[self.name].weight * lora.scaling[self.name]

    def to_artifact(self) -> RequestAdapter:
        if self.kind == "dense":
            return RequestAdapter.from_dense({n: p for n, p in self._delta_params.items()})
        tensors, scales = {}, {}
        for n, layer in self.layers.items():
            tensors[f"{n}.lora_A"] = layer.lora_A[self.name].weight.detach().float().cpu().clone()
            tensors[f"{n}.lora_B"] = layer.lora_B[self.name].weight.detach().float().cpu().clone()
            scales[n] = float(layer.scaling[self.name])
        return RequestAdapter("lora", tensors, scales)
