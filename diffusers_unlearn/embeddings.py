"""Concept embeddings: the cross-attention input vector that stands for a concept.

A concept's embedding is the text-encoder hidden state (what the UNet's K/V projections read) at the concept's own
tokens, averaged over those tokens and over every template of its domain. Gradient projection keeps K/V outputs on
these vectors fixed; similarity analysis compares them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._warn import warn
from .conditioning import TextConditioner
from .prompts import TEMPLATES, check_concept, check_domain, concept_prompts, validate_templates

_CACHE_ATTR = "_unlearn_embedding_cache"


def _find_sublist(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return -1


def _content_positions(ids: list[int], tokenizer: Any) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [i for i, token in enumerate(ids) if token not in special]


@torch.no_grad()
def concept_embedding(
    pipe: Any, concept: str, domain: str | None = None, templates: Sequence[str] | None = None
) -> torch.Tensor:
    """The 1-D vector (shape ``[d]``, d = the UNet's cross-attention input size) that stands for ``concept``.

    Averaged over the concept's tokens inside each template of ``domain`` (default domain: "concept").
    Results are cached on the pipeline; the text encoders are never trained here, so the cache stays valid.
    """
    concept = check_concept(concept)
    chosen = validate_templates(templates) if templates is not None else TEMPLATES[check_domain(domain)]
    cache: dict = pipe.__dict__.setdefault(_CACHE_ATTR, {})
    key = (concept.lower(), chosen)
    if key in cache:
        return cache[key].clone()

    conditioner = TextConditioner(pipe)
    tokenizer = pipe.tokenizer
    prompts = concept_prompts(concept, templates=chosen)
    hidden, ids = conditioner.token_hidden_states(prompts)
    concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
    vectors, mismatched = [], []
    for row, prompt_ids in enumerate(ids):
        start = _find_sublist(prompt_ids, concept_ids)
        if start >= 0:
            positions = list(range(start, start + len(concept_ids)))
        else:  # the template changed how the concept tokenizes (or truncated it): use every content token
            positions = _content_positions(prompt_ids, tokenizer)
            mismatched.append(prompts[row])
        vectors.append(hidden[row, positions].mean(dim=0))
    if mismatched:  # one warning per concept, not one per prompt
        warn(f"concept {concept!r} does not tokenize the same inside {len(mismatched)} of its {len(prompts)} prompts "
             f"(e.g. {mismatched[0]!r}); its embedding there averages every token of the prompt")
    embedding = torch.stack(vectors).mean(dim=0).cpu()
    cache[key] = embedding
    return embedding.clone()


def cosine_similarities(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a ``[d]`` vector with each column of a ``[d, m]`` matrix."""
    return torch.nn.functional.cosine_similarity(others.T.double(), target.double()[None, :], dim=1).float()
