"""Sibling states: what a concept's prompts read when one of its words is replaced by random token embeddings.

A removal named through the API cannot know which concepts its user keeps, and the ones most at risk share words
with it ("neon dots" beside a removed "neon lines"): a causal text encoder gives the shared word the same state in
both prompts, and the states after it differ only by what the other word adds. Each word of the concept is replaced
in turn, in each of the request's prompts, by random token embeddings drawn from a Gaussian with the per-feature mean
and spread of the text encoder's own token table: no real word is named, so no concept is protected by name, but the
solve sees how the states after the shared word vary with the word beside it and is steered (as a soft penalty) to
an edit that moves the concept's own combination rather than everything its words enter.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from ...families.conditioning import _find_sublist
from ...families.registry import text_encoder_pairs
from ...kv.text_states import PromptStates

_CACHE = "_unlearn_closed_form_siblings"
ENCODE_BATCH = 64  # sibling prompts per text-encoder pass: bounds the memory on wide encoders (T5)


def table_statistics(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-feature mean and spread of a token embedding table.

    Args:
        table: the text encoder's input embeddings [vocabulary, width].

    Returns:
        (mean [width], standard deviation [width]), float32 on the CPU.
    """
    rows = table.detach().float().cpu()
    return rows.mean(dim=0), rows.std(dim=0)


def draw_embeddings(mean: torch.Tensor, spread: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Random token embeddings from a Gaussian with a per-feature mean and spread (``table_statistics``).

    Args:
        mean: [width], the mean of each feature.
        spread: [width], the standard deviation of each feature.
        count: how many embeddings to draw.
        generator: the random generator (seeded by the caller, so that the draws repeat).

    Returns:
        [count, width] float32.
    """
    return mean + spread * torch.randn(count, mean.shape[0], generator=generator)


def _word_spans(tokenizer: Any, concept: str, words: Sequence[str]
                ) -> tuple[list[int], dict[str, tuple[int, int] | None]]:
    """The concept's token ids and, per word, (where its tokens start inside them, how many); None for a word whose
    tokens alone are not found inside the concept's."""
    concept_ids = tokenizer(concept, add_special_tokens=False).input_ids
    spans = {}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        inner = _find_sublist(concept_ids, ids)
        spans[word] = (inner, len(ids)) if inner >= 0 else None
    return concept_ids, spans


@torch.no_grad()
def sibling_tokens(pipe: Any, concept: str, prompts: Sequence[str], count: int, states: PromptStates,
                   seed: int = 0, max_prompts: int = 8) -> torch.Tensor:
    """Token states [n, d] (float64) of ``concept``'s prompts with each of its words replaced by random embeddings.

    Args:
        pipe: the pipeline whose text encoders are read.
        concept: the concept; each whitespace-separated word is replaced in turn.
        prompts: the prompts naming it (the first ``max_prompts`` that contain it are used).
        count: random replacements per word and prompt.
        states: the token states to read.
        seed: the draws' seed (the same states on every machine and in every request of a stream).
        max_prompts: at most this many prompts.

    Returns:
        [n, d] float64: in each sibling prompt, the replaced word's first token and every token after it.
    """
    words = concept.split()
    chosen = [p for p in prompts if concept.lower() in p.lower()][:max_prompts]
    cache: dict = pipe.__dict__.setdefault(_CACHE, {})
    key = (concept.lower(), tuple(chosen), count, seed, max_prompts, states.key)
    if key in cache:
        return cache[key]
    if not chosen or count <= 0:
        return torch.zeros(0, states.conditioner.cross_attention_dim, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    rows: list[tuple[str, str]] = []  # (prompt, word replaced)
    for prompt in chosen:
        for word in words:
            rows += [(prompt, word)] * count
    encoders = [(getattr(pipe, e), getattr(pipe, t)) for t, e in text_encoder_pairs(pipe)]
    replacements = []  # per encoder: the concept's ids, each word's span inside them, one draw per row
    for encoder, tokenizer in encoders:
        mean, spread = table_statistics(encoder.get_input_embeddings().weight)
        concept_ids, spans = _word_spans(tokenizer, concept, words)
        # one embedding per token of the replaced word; where it lies is found in each row's ids at run time
        lengths = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in words}
        vectors = [draw_embeddings(mean, spread, lengths[w], generator) for _, w in rows]
        replacements.append((concept_ids, spans, vectors))

    chunk: list[int] = []  # the rows of ``rows`` being encoded now

    def hook_for(concept_ids: list[int], spans: dict[str, tuple[int, int] | None], vectors: list[torch.Tensor]):
        def replace(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            ids = inputs[0]
            if ids.shape[0] != len(chunk):
                return output  # another call inside the encoder (none today): leave it alone
            output = output.clone()
            for position, row in enumerate(chunk):
                span, start = spans[rows[row][1]], _find_sublist(ids[position].tolist(), concept_ids)
                if span is None or start < 0:
                    continue  # truncated, or tokenized differently inside this prompt
                at, length = start + span[0], span[1]
                output[position, at:at + length] = vectors[row][:length].to(output.device, output.dtype)
            return output
        return replace

    collected = []
    with ExitStack() as stack:
        for (encoder, _), replacement in zip(encoders, replacements):
            handle = encoder.get_input_embeddings().register_forward_hook(hook_for(*replacement))
            stack.callback(handle.remove)
        for first in range(0, len(rows), ENCODE_BATCH):
            chunk[:] = range(first, min(first + ENCODE_BATCH, len(rows)))
            hidden, segments = states.states([rows[row][0] for row in chunk])  # [T, B, L, d]
            for segment in segments:
                concept_ids, spans = _word_spans(segment.tokenizer, concept, words)
                end = segment.offset + len(segment.ids[0])
                for position, row in enumerate(chunk):
                    span, start = spans[rows[row][1]], _find_sublist(segment.ids[position], concept_ids)
                    if span is not None and start >= 0:
                        collected.append(hidden[:, position, segment.offset + start + span[0]:end].flatten(0, 1))
    result = torch.cat(collected) if collected else torch.zeros(0, hidden.shape[-1], dtype=torch.float64)
    cache[key] = result
    return result
