"""Analysis: are semantically close concepts the ones an unlearning request disturbs most?

For a target and a list of other concepts, ``similarity_vs_change`` gives each concept's text-embedding cosine
similarity to the target and the relative change of the K/V outputs on its embedding, ||dW c|| / ||W c||,
averaged over (and maximal across) the K/V layers: the data behind the paper's "semantically similar concepts are
harder to preserve" figure. Works on any attached pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .embeddings import concept_embedding, cosine_similarities
from .state import unlearning_state


@dataclass
class ConceptChange:
    concept: str
    domain: str | None
    similarity: float  # cosine similarity of the text embeddings with the target
    kv_change: float  # mean over K/V layers of ||dW c|| / ||W c||
    kv_change_max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def similarity_vs_change(
    pipe: Any,
    target: str,
    others: Sequence[str | tuple[str, str | None]],
    *,
    domain: str | None = None,
    request_id: str | None = None,
) -> list[ConceptChange]:
    """Similarity to ``target`` and K/V output change for each of ``others`` (most similar first).

    ``others`` are concept names (embedded in ``domain``) or ``(concept, domain)`` pairs. dW is the change of
    request ``request_id``, or of every active request together (as composed) when it is None; W is the base.
    """
    state = unlearning_state(pipe)
    if request_id is not None:
        deltas = state.artifact(request_id).deltas()
    else:
        deltas = state.composed_deltas()
    if deltas is None:
        raise ValueError("the pipeline holds no unlearning request: nothing has changed yet")
    pairs = [(o, domain) if isinstance(o, str) else (o[0], o[1]) for o in others]
    target_vec = concept_embedding(pipe, target, domain)
    vectors = torch.stack([concept_embedding(pipe, c, d) for c, d in pairs], dim=1)
    sims = cosine_similarities(target_vec, vectors)
    rows = []
    for i, (concept, concept_domain) in enumerate(pairs):
        c = vectors[:, i]
        ratios = torch.stack([
            (deltas[layer].float() @ c).norm() / (base.float().cpu() @ c).norm()
            for layer, base in state.base_weights.items()
        ])
        rows.append(ConceptChange(concept, concept_domain, float(sims[i]), float(ratios.mean()), float(ratios.max())))
    return sorted(rows, key=lambda r: -r.similarity)


def plot_similarity_vs_change(rows: Sequence[ConceptChange], path: str | os.PathLike, title: str = "") -> None:
    """Scatter plot (PNG) of K/V output change against text-embedding similarity to the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([r.similarity for r in rows], [r.kv_change for r in rows])
    for r in rows:
        ax.annotate(r.concept, (r.similarity, r.kv_change), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cosine similarity to the target (text embedding)")
    ax.set_ylabel("relative K/V output change")
    ax.set_title(title or "semantically close concepts move more")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
