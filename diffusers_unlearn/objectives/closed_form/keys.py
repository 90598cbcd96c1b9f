"""What the closed form solves on: the token pairs it maps (the concept's, and each earlier removal's, onto their
anchors) and the states it protects (the kept concepts' embeddings and the empty prompt's tokens)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ...families.conditioning import _find_sublist
from ...prompts import TEMPLATES, provide_domain, same_concept
from ...kv.text_states import PromptStates
from ...vocabulary import DEFAULT_VOCABULARY
from ..base import prompts_by_concept, swap_concept
from .config import ClosedFormConfig


def default_states(pipe: Any) -> PromptStates:
    """The token states a request with the default settings solves on (the default sampling steps' timesteps).

    Args:
        pipe: the pipeline whose text encoders and first K/V inputs give the states.

    Returns:
        The pipeline's ``PromptStates`` at ``ClosedFormConfig()``'s sampling steps and guidance scale.
    """
    defaults = ClosedFormConfig()
    return PromptStates.for_pipeline(pipe, steps=defaults.sampling_steps, guidance_scale=defaults.guidance_scale)


def mapping_keys(pipe: Any, concept: str, anchor: str, prompts: Sequence[str], all_tokens: bool = True,
                 negative_guidance: float = 0.0, states: PromptStates | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token pairs of ``concept`` -> ``anchor``: (keys [n, d], target keys [n, d]), float64.

    In each prompt (and its copy with the anchor in the concept's place), the concept's last token and every
    token after it pair with the anchor's last token (the token before the slot for an empty anchor) and every
    token after that, offset by offset, as UCE aligns them; with ``all_tokens`` the concept's earlier tokens pair
    with the anchor's last one too. Prompts without the concept are skipped. ``negative_guidance`` g: each key x
    aims at a + g (a - x), past its anchor a. Where several tokenizers make up the text sequence (SD3: CLIP, then
    T5) the pairs are aligned inside each one's segment; where the states depend on the timestep (SD3, Flux), every
    pair is taken at each timestep of ``states`` (default: ``default_states``).

    Args:
        pipe: the pipeline whose text states are read.
        concept: the concept whose tokens are mapped.
        anchor: what they map onto ("" for the empty slot).
        prompts: the prompts naming the concept; the anchor prompts are these with the concept swapped.
        all_tokens: also pair the concept's earlier tokens with the anchor's last one.
        negative_guidance: g >= 0, how far past its anchor each key aims.
        states: the token states to read (default: ``default_states(pipe)``).

    Returns:
        (keys [n, d], target keys [n, d]), float64.

    Raises:
        ValueError: no prompt contains the concept, or its tokens cannot be found in any of them.
    """
    pairs = [(p, swap_concept(p, concept, anchor)) for p in prompts if concept.lower() in p.lower()]
    if not pairs:
        raise ValueError(f"none of the prompts {list(prompts)} contains the concept {concept!r}")
    states = default_states(pipe) if states is None else states
    hidden, segments = states.states([p for p, _ in pairs] + [a for _, a in pairs])  # [T, 2n, L, d]
    keys, anchors = [], []
    n = len(pairs)
    for segment in segments:
        tokenizer, ids, offset = segment.tokenizer, segment.ids, segment.offset
        concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
        anchor_ids = tokenizer(anchor, add_special_tokens=False).input_ids if anchor else []
        for row in range(n):
            start = _find_sublist(ids[row], concept_ids)
            if start < 0:
                continue  # truncated or tokenized differently inside this template
            a_start = _find_sublist(ids[n + row], anchor_ids) if anchor_ids else start
            if a_start < 0:
                continue
            first = start + len(concept_ids) - 1
            a_first = a_start + len(anchor_ids) - 1
            length = len(ids[row]) - max(first, a_first)
            keys.append(hidden[:, row, offset + first:offset + first + length])
            anchors.append(hidden[:, n + row, offset + a_first:offset + a_first + length])
            if all_tokens and first > start:
                # the concept's earlier words (a family word such as "ocean" in "ocean waves") carry part of it too
                keys.append(hidden[:, row, offset + start:offset + first])
                anchors.append(hidden[:, n + row, offset + a_first:offset + a_first + 1].expand(-1, first - start, -1))
    if not keys:
        raise ValueError(f"concept {concept!r} could not be located in the tokens of {[p for p, _ in pairs]}")
    keys, anchors = torch.cat([k.flatten(0, 1) for k in keys]), torch.cat([a.flatten(0, 1) for a in anchors])
    # the tokens after the concept are guided too: guiding only the concept's own tokens erased no more than g = 0
    return keys, anchors + negative_guidance * (anchors - keys)


def protected_columns(pipe: Any, concept: str, domain: str, config: ClosedFormConfig, removed: Sequence[str],
                      states: PromptStates | None = None, progress: bool = False
                      ) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """P [d, m] (float64): kept/auxiliary concept embeddings (one per timestep of ``states`` where they depend on
    it) and the empty prompt's tokens; the (concept, domain) pairs behind them.

    Args:
        pipe: the pipeline whose text states are read.
        concept: the concept being removed (left out of what is kept).
        domain: its domain (the kept concepts of ``config.keep`` are embedded in it).
        config: the request's settings (``keep``, ``vocabulary``, ``protection``, ``protect_unconditional``).
        removed: concepts removed earlier (left out of what is kept).
        states: the token states to read (default: ``default_states(pipe)``).
        progress: show a progress bar while encoding the kept concepts.

    Returns:
        (P [d, m], the kept (concept, domain) pairs in the order their columns were added).
    """
    states = default_states(pipe) if states is None else states
    vocabulary = DEFAULT_VOCABULARY if config.vocabulary is None else config.vocabulary
    if isinstance(vocabulary, Mapping):
        candidates = [(c, d) for d, cs in vocabulary.items() for c in cs if provide_domain(d)]
    else:
        candidates = [(c, domain) for c in vocabulary]
    candidates = [(c, domain) for c in config.keep] + candidates
    taken = [concept, *removed]
    chosen = list(dict.fromkeys((c, d) for c, d in candidates if not any(same_concept(c, t) for t in taken)))
    encoding = tqdm(chosen, desc=f"encoding {len(chosen)} kept concepts", disable=not progress, leave=False)
    columns = [concept_states(pipe, c, d, states)[1] for c, d in encoding] if config.protection == "span" else []
    if config.protect_unconditional:
        columns.append(states.unconditional())
    columns = torch.cat(columns) if columns else torch.zeros(0, states.conditioner.cross_attention_dim,
                                                             dtype=torch.float64)
    return columns.T.contiguous(), chosen


_TOKEN_CACHE = "_unlearn_closed_form_tokens"


@torch.no_grad()
def concept_states(pipe: Any, concept: str, domain: str, states: PromptStates | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``concept`` in every template of its domain, float64: (its first token and every one after it in each
    tokenizer segment [n, d] (the tokens its presence changes), its embeddings [T * S, d]: per tokenizer segment
    (S: 1, or SD3's CLIP and T5) the mean over templates of the mean over its own tokens, at each timestep of
    ``states``). Cached on the pipeline (the text encoders and the layers before the edited K/V are never
    trained).

    Args:
        pipe: the pipeline whose text states are read (and that holds the cache).
        concept: the concept to embed.
        domain: its domain (picks the templates).
        states: the token states to read (default: ``default_states(pipe)``).

    Returns:
        (token states [n, d], embeddings [T * S, d]), float64.
    """
    states = default_states(pipe) if states is None else states
    cache: dict = pipe.__dict__.setdefault(_TOKEN_CACHE, {})
    key = (concept.lower(), TEMPLATES[domain], states.key)
    if key not in cache:
        prompts = [t.format(concept) for t in TEMPLATES[domain]]
        hidden, segments = states.states(prompts)
        rows = []
        for segment in segments:
            concept_ids = segment.tokenizer(concept, add_special_tokens=False).input_ids
            end = segment.offset + len(segment.ids[0])
            for row, prompt_ids in enumerate(segment.ids):
                start = segment.offset + max(_find_sublist(prompt_ids, concept_ids), 0)
                rows.append(hidden[:, row, start:end].flatten(0, 1))
        # one embedding per tokenizer segment: SD3's CLIP and T5 tokens of a concept are unrelated states, and the
        # average of the two would keep neither
        positions = states.conditioner.concept_positions(prompts, concept)
        embedding = []
        for segment in segments:
            end = segment.offset + len(segment.ids[0])
            means = [hidden[:, row, inside].mean(dim=1) for row, where in enumerate(positions)
                     if (inside := [i for i in where if segment.offset <= i < end])]
            if means:
                embedding.append(torch.stack(means).mean(dim=0))
        cache[key] = (torch.cat(rows), torch.cat(embedding))
    return cache[key]


def concept_tokens(pipe: Any, concept: str, domain: str, states: PromptStates | None = None) -> torch.Tensor:
    """Token states [n, d] (float64) of ``concept`` in every template of its domain: its first token and every one
    after it (see ``concept_states``).

    Args:
        pipe: the pipeline whose text states are read.
        concept: the concept to read.
        domain: its domain (picks the templates).
        states: the token states to read (default: ``default_states(pipe)``).

    Returns:
        The token states [n, d], float64.
    """
    return concept_states(pipe, concept, domain, states)[0]


@dataclass
class EarlierRequest:
    """What the solve needs of an earlier request: its concept, domain, prompts and anchor, and, for an earlier
    closed-form request, the mapping it was solved with (None: the current request's).

    Attributes:
        concept: the concept it removed.
        domain: its domain.
        prompts: the prompts it was made with.
        anchor: what its concept maps onto ("" for the empty slot, and for methods without an anchor).
        negative_guidance: its own guidance, for a closed-form request (None: the current request's).
        map_every_token: its own token mapping, for a closed-form request (None: the current request's).
    """

    concept: str
    domain: str
    prompts: list[str]
    anchor: str
    negative_guidance: float | None = None
    map_every_token: bool | None = None


def earlier_requests(records: Sequence[Any]) -> list[EarlierRequest]:
    """Earlier removals from ledger records; a record's anchor is its method's anchor ("" for ESD-like methods). An
    earlier closed-form request keeps its own guidance and token mapping, so that a later request with other
    settings keeps it where it was solved; other methods' records are mapped with the current request's.

    Args:
        records: the ledger records of the requests before this one, in ledger order.

    Returns:
        One ``EarlierRequest`` per concept of each record (a record of several concepts gives one per concept, with
        the prompts that name it), in ledger order.
    """
    out = []
    for record in records:
        config = getattr(record, "method_config", None) or {}
        anchor = config.get("anchor") or ""
        prompts = list(getattr(record, "prompts", None) or [])
        own = getattr(record, "method", None) == ClosedFormConfig.method
        concepts = tuple(getattr(record, "concepts", None) or (record.concept,))
        groups = prompts_by_concept(prompts, concepts) if len(concepts) > 1 and prompts else \
            {c: prompts for c in concepts}
        for concept in concepts:
            out.append(EarlierRequest(concept, record.domain, groups[concept], " ".join(str(anchor).split()),
                                      config.get("negative_guidance") if own else None,
                                      config.get("map_every_token") if own else None))
    return out
