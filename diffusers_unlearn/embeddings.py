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
from .families.registry import conditioner_for
from .prompts import TEMPLATES, check_concept, check_domain, concept_prompts, validate_templates

_CACHE_ATTR = "_unlearn_embedding_cache"


@torch.no_grad()
def concept_embedding(
    pipe: Any, concept: str, domain: str | None = None, templates: Sequence[str] | None = None
) -> torch.Tensor:
    """The vector the K/V projections read for ``concept``: what gradient projection keeps fixed.

    The text state at the concept's own tokens, averaged over those tokens and over each template of ``domain``.
    Results are cached on the pipeline; the text encoders are never trained here, so the cache stays valid.

    Args:
        pipe: a pipeline of a supported family.
        concept: the concept, e.g. ``"van gogh"``.
        domain: whose templates to use (None: the generic ``"concept"`` domain).
        templates: templates with a ``{}`` slot, instead of the domain's.

    Returns:
        A ``[d]`` float tensor on the CPU, d the K/V layers' input size.

    Raises:
        TypeError: a concept that is not a string.
        ValueError: an empty concept, an unknown domain, or a template without exactly one ``{}`` slot.

    Examples:
        >>> import diffusers_unlearn as du
        >>> pipe = du.testing.tiny_pipeline(seed=0)
        >>> concept_embedding(pipe, "van gogh", "style").shape
        torch.Size([32])
    """
    concept = check_concept(concept)
    chosen = validate_templates(templates) if templates is not None else TEMPLATES[check_domain(domain)]
    return _embeddings(pipe, [(concept, chosen)])[:, 0]


@torch.no_grad()
def concept_embeddings(pipe: Any, concepts: Sequence[tuple[str, str | None]], prompts_per_batch: int = 256
                       ) -> torch.Tensor:
    """``[d, m]``: :func:`concept_embedding` of each ``(concept, domain)``, the ones not cached yet computed in
    batched text-encoder passes (a protected set of a hundred concepts is a few passes, not a hundred)."""
    return _embeddings(pipe, [(check_concept(c), TEMPLATES[check_domain(d)]) for c, d in concepts],
                       prompts_per_batch)


def _embeddings(pipe: Any, items: Sequence[tuple[str, tuple[str, ...]]], prompts_per_batch: int = 256
                ) -> torch.Tensor:
    """``[d, m]`` for checked ``(concept, templates)`` pairs; results are cached on the pipeline (the text encoders
    are never trained here, so the cache stays valid) and the uncached ones share batched text-encoder passes."""
    cache: dict = pipe.__dict__.setdefault(_CACHE_ATTR, {})
    keys = [(concept.lower(), templates) for concept, templates in items]
    missing = {key: concept for key, (concept, _) in zip(keys, items) if key not in cache}
    if missing:
        conditioner = conditioner_for(pipe)
        rows = []  # (key, prompt, the concept's token positions in it)
        for key, concept in missing.items():
            prompts = concept_prompts(concept, templates=key[1])
            rows += [(key, p, where) for p, where in zip(prompts, conditioner.concept_positions(prompts, concept))]
        vectors: dict = {key: [] for key in missing}
        for start in range(0, len(rows), prompts_per_batch):
            chunk = rows[start:start + prompts_per_batch]
            hidden = conditioner.text_states([prompt for _, prompt, _ in chunk])
            for i, (key, _, where) in enumerate(chunk):
                vectors[key].append(hidden[i, where].mean(dim=0))
        for key, found in vectors.items():
            cache[key] = torch.stack(found).mean(dim=0).cpu()
    return torch.stack([cache[key] for key in keys], dim=1).clone()


def cosine_similarities(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """How close a concept is to each of several others (semantic neighbours are the hardest to keep).

    Args:
        target: a ``[d]`` vector, e.g. a :func:`concept_embedding`.
        others: a ``[d, m]`` matrix, one concept per column.

    Returns:
        ``[m]`` cosine similarities, computed in float64 and returned as float32.

    Examples:
        >>> import torch
        >>> cosine_similarities(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([1., 0.])
    """
    return torch.nn.functional.cosine_similarity(others.T.double(), target.double()[None, :], dim=1).float()
