"""Concept embeddings: the K/V input vector that stands for a concept.

A concept's embedding is the text state the K/V projections read at the concept's own tokens, averaged over those
tokens and over every template of its domain: the text encoder's hidden state for the UNets, and for SD3 / Flux the
text stream entering the first joint block (``context_embedder`` of the encoders' states; the blocks then
normalise and modulate it per timestep, see gradient projection). Gradient projection keeps K/V outputs on
these vectors fixed (UNets); similarity analysis compares them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._warn import warn
from .families import conditioner_for
from .prompts import TEMPLATES, check_concept, check_domain, concept_prompts, validate_templates

_CACHE_ATTR = "_unlearn_embedding_cache"


@torch.no_grad()
def concept_embedding(
    pipe: Any, concept: str, domain: str | None = None, templates: Sequence[str] | None = None
) -> torch.Tensor:
    """The 1-D vector (shape ``[d]``, d = the K/V layers' input size) that stands for ``concept``.

    Averaged over the concept's tokens inside each template of ``domain`` (default domain: "concept").
    Results are cached on the pipeline; the text encoders are never trained here, so the cache stays valid.
    """
    concept = check_concept(concept)
    chosen = validate_templates(templates) if templates is not None else TEMPLATES[check_domain(domain)]
    cache: dict = pipe.__dict__.setdefault(_CACHE_ATTR, {})
    key = (concept.lower(), chosen)
    if key in cache:
        return cache[key].clone()

    conditioner = conditioner_for(pipe)
    prompts = concept_prompts(concept, templates=chosen)
    hidden = conditioner.text_states(prompts)
    positions = conditioner.concept_positions(prompts, concept)
    vectors = [hidden[row, where].mean(dim=0) for row, where in enumerate(positions)]
    embedding = torch.stack(vectors).mean(dim=0).cpu()
    cache[key] = embedding
    return embedding.clone()


def cosine_similarities(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a ``[d]`` vector with each column of a ``[d, m]`` matrix."""
    return torch.nn.functional.cosine_similarity(others.T.double(), target.double()[None, :], dim=1).float()
