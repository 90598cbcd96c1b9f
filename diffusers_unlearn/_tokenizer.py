"""Offline CLIP tokenizers: a real byte-level BPE ``CLIPTokenizer`` whose merges cover a given word list.

Tests and the shipped MiniCanvas model cannot download ``openai/clip-vit-large-patch14``'s vocabulary, so a small
vocabulary is learnt here, with the same split and byte-level pre-tokenization as CLIP (not with ``tokenizers``'
trainer, whose token ids vary from run to run). Every word of the list becomes a single token; any other text still
tokenizes, into byte-level pieces.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from typing import Any

from tokenizers import Regex, pre_tokenizers
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's own split pattern (see transformers' CLIPTokenizer): words, single digits, runs of punctuation.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style byte-level BPE vocabulary in which every word of ``words`` is one token (cached).

    Returns ``(vocab, merges)`` as ``CLIPTokenizer(vocab=..., merges=...)`` takes them, laid out like CLIP's own
    (byte symbols, byte symbols ending a word, merged symbols in merge order, then the two special tokens).
    Deterministic: the most frequent pair is merged first, ties broken by the pair itself.
    """
    vocab, merges = _learn(tuple(sorted(set(words))))
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=8)
def _learn(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces = sorted(
        {
            symbol
            for text in words
            for piece, _ in _pre_tokenizer().pre_tokenize_str(text.lower())
            for symbol, _ in byte_level.pre_tokenize_str(piece)
        }
    )
    sequences = [list(piece[:-1]) + [piece[-1] + "</w>"] for piece in pieces if piece]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in sequences:
            counts.update(zip(seq, seq[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        sequences = [_merge(seq, best) for seq in sequences]
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def _merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True)


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` built offline whose vocabulary covers ``words`` (see :func:`clip_vocabulary`)."""
    vocab, merges = clip_vocabulary(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


# T5's special tokens, in T5's own order (ids 0, 1, 2).
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
_SPACE = "\u2581"  # SentencePiece's word-start marker


def build_t5_tokenizer(words: Iterable[str], model_max_length: int = 512) -> Any:
    """A real ``T5Tokenizer`` (SentencePiece-style unigram) built offline whose vocabulary has every word of
    ``words`` as one piece; any other text still tokenizes, into single characters (or ``<unk>``).

    The pieces' scores make a whole word always beat its characters: a word costs one piece, characters cost more.
    """
    from transformers import T5Tokenizer

    pieces = sorted({w for text in words for w in text.lower().split()})
    characters = sorted({c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'-!?&"})
    vocab = [(token, 0.0) for token in T5_SPECIAL] + [(_SPACE, -2.0)]
    vocab += [(_SPACE + word, -1.0) for word in pieces]
    vocab += [(c, -5.0) for c in characters] + [(_SPACE + c, -5.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
