"""How much room gradient projection leaves: the share of a target's concept embedding inside the protected span.

Gradient projection may only change K/V along directions orthogonal to the protected embeddings, so only the
target embedding's residual outside their span can carry the erasure. This measures that share for the bench's
default protection (earlier removals, the world's auxiliary set or its K nearest, the empty prompt's tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch

from ..kv.adapters import kv_weights
from ..embeddings import concept_embedding
from ..regularizers import GradientProjection
from ..regularizers.base import TrainingContext
from ..regularizers.projection import complement_projector
from .world import BenchWorld


def protected_share(pipe: Any, world: BenchWorld, target: str, domain: str = "style",
                    removed: Sequence[str] = (), neighbors: int | None = None) -> dict[str, Any]:
    """``{"share", "columns", "protected", "unconditional_share"}`` for removing ``target`` after ``removed``.

    ``share``: fraction of the squared norm of ``du.concept_embedding(pipe, target, domain)`` inside the span of
    the columns gradient projection would protect (``neighbors=None``: the whole auxiliary set, the bench's
    default); ``unconditional_share``: the same for the empty prompt's token states alone.
    """
    world.register_domains()
    prompt_domain = world.prompt_domain(domain)
    pool = world.vocabulary()
    count = sum(len(c) for c in pool.values()) if neighbors is None else neighbors
    gp = GradientProjection(neighbors=count, vocabulary=pool)
    ctx = TrainingContext(pipe=pipe, denoiser=pipe.unet, adapter=None, objective=None, concept=target,
                          domain=prompt_domain,
                          earlier=[SimpleNamespace(concept=c, domain=prompt_domain) for c in removed],
                          base_weights=kv_weights(pipe.unet), start_offsets=None)
    columns, used = gp._columns(ctx, gp.protected_concepts(ctx))
    vector = concept_embedding(pipe, target, prompt_domain).double()

    def share(cols: torch.Tensor) -> float:
        projector, _ = complement_projector(cols)
        return float(1 - (projector @ vector).square().sum() / vector.square().sum())

    unconditional = columns[:, columns.shape[1] - gp._unconditional_columns:]
    return {"share": share(columns), "columns": int(columns.shape[1]), "protected": len(used),
            "unconditional_share": share(unconditional), "dimension": int(vector.numel())}
