"""Analysis: are semantically close concepts the ones an unlearning request disturbs most?

For a target and a list of other concepts, ``similarity_vs_change`` gives each concept's text-embedding cosine
similarity to the target and the relative change of the K/V outputs on its embedding, ||dW c|| / ||W c||,
averaged over (and maximal across) the K/V layers: the data behind the paper's "semantically similar concepts are
harder to preserve" figure. Works on any attached pipeline.

``text_stream_change`` measures what gradient projection keeps on joint transformers (SD3, Flux), where each
block's K/V read a different text state: the relative change of each K/V layer's output on the states it reads at
a concept's tokens, on held-out x_t (trajectories sampled with another seed than the request's).

``conditioning_routes`` asks, before a request, whether a K/V edit can reach a concept at all. SDXL, SD3 and Flux
also read a pooled text vector (SDXL's ``add_embedding``, SD3's and Flux's ``time_text_embed``) that no K/V layer
sees: what a model reads there, a K/V adapter cannot remove. For a prompt and another prompt it swaps only the
pooled vector, or only the tokens, and reports how much of the full output change each swap makes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._validation import check_int, check_number, check_seed
from .families.conditioning import Conditioning
from .embeddings import concept_embedding, cosine_similarities
from .families.registry import conditioner_for, denoiser_of
from .prompts import TEMPLATES, check_domain, concept_prompts
from .kv.text_states import ProtectedPrompt, collect_block_states, relative_change
from .engine.state import rebuild, unlearning_state


@dataclass
class ConceptChange:
    concept: str
    domain: str | None
    similarity: float  # cosine similarity of the text embeddings with the target
    kv_change: float  # mean over K/V layers of ||dW c|| / ||W c||
    kv_change_max: float

    def to_dict(self) -> dict[str, Any]:
        """The four fields as a JSON-able map."""
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


def text_stream_change(
    pipe: Any, request_id: str, concept: str, *, domain: str | None = None, seed: int = 1, samples_per_step: int = 1
) -> dict[str, float]:
    """Per K/V layer, the largest ||dW s|| / ||W s|| over the states s that layer reads at ``concept``'s tokens
    (one per template of ``domain`` and x_t), dW = request ``request_id``'s change, W = the base.

    The x_t are held out: trajectories of the request's start model (the requests before it, or the base for merge
    strategies) sampled with ``seed`` at the request's own sampling settings (steps, guidance, resolution); the
    first ``samples_per_step`` trajectories of each step are used. For a concept gradient projection kept, the
    first joint block's value is zero up to float rounding; later blocks show how far the protection carries to
    x_t it was not collected on.
    """
    state = unlearning_state(pipe)
    state.check_request_id(request_id)
    record = state.ledger.get(request_id)
    options = record.method_config
    conditioner = conditioner_for(pipe, guidance_scale=options.get("guidance_scale"))
    prompts = list(concept_prompts(concept, templates=TEMPLATES[check_domain(domain)]))
    positions = conditioner.concept_positions(prompts, concept)
    protected = [ProtectedPrompt(p, where) for p, where in zip(prompts, positions)]
    ids = state.ledger.ids()
    sequential = record.strategy.get("strategy", "sequential") == "sequential"
    earlier = ids[: ids.index(request_id)] if sequential else []
    denoiser = denoiser_of(pipe)
    artifact = state.artifacts[request_id]
    try:
        rebuild(pipe, earlier, mode="folded")
        cond = conditioner.encode(prompts)
        latents, timesteps = conditioner.sample_trajectory(
            denoiser, cond, conditioner.encode_unconditional(len(prompts)), steps=int(options["sampling_steps"]),
            guidance_scale=float(options["guidance_scale"]), generator=torch.Generator().manual_seed(seed),
            resolution=options.get("resolution"),
        )
        states = collect_block_states(conditioner, denoiser, artifact.layers, protected, latents, timesteps,
                                      samples_per_step)
    finally:
        rebuild(pipe)
    base = {name: w.float().cpu() for name, w in state.base_weights.items()}
    return relative_change(artifact.deltas(), base, states)


@dataclass
class ConditioningRoutes:
    """How ``other``'s conditioning changes the model's output on ``prompt``'s x_t, by route: each value is
    ||f(swapped) - f(prompt)|| / ||f(other) - f(prompt)||, summed over the trajectory's steps."""

    prompt: str
    other: str
    pooled: float  # only the pooled text vector swapped to ``other``'s: the part K/V adapters cannot reach
    tokens: float  # only the token states swapped: the part that reaches the model through the K/V layers

    def to_dict(self) -> dict[str, Any]:
        """The four fields as a JSON-able map."""
        return asdict(self)


@torch.no_grad()
def conditioning_routes(pipe: Any, prompt: str, others: Sequence[str], *, steps: int = 4,
                        guidance_scale: float = 3.0, seed: int = 0) -> list[ConditioningRoutes]:
    """How much of what sets two prompts apart reaches the model through the pooled text vector, which no K/V edit
    can change.

    For each of ``others``: how much of the change from ``prompt``'s conditioning to its own the pooled text vector
    alone makes, and the token states alone, on the x_t of ``prompt``'s trajectory, on the pipeline as it is now.
    ``pooled`` near 1 and ``tokens`` near 0: the model tells the two prompts apart through the pooled vector, and an
    erasure that edits K/V layers only (every method here) cannot remove the difference. The two need not add up
    to 1 (the routes interact).

    Args:
        pipe: an SDXL, SD3 or Flux pipeline (SD 1.x / 2.x have no pooled text vector).
        prompt: the prompt whose trajectory gives the x_t, e.g. one with the concept to remove.
        others: prompts to compare with, e.g. the same prompt with another concept.
        steps: steps of the pipeline's scheduler for the trajectory.
        guidance_scale: the trajectory's guidance (the requests' default; Flux's embedded guidance too).
        seed: the trajectory's noise.

    Returns:
        One ``ConditioningRoutes`` per prompt of ``others``, in order.

    Raises:
        TypeError: ``prompt`` is not a string or ``others`` not a list of strings.
        ValueError: ``others`` is empty, a setting is out of range, or the pipeline has no pooled text vector.
    """
    if (not isinstance(prompt, str) or isinstance(others, str) or not isinstance(others, Sequence)
            or not all(isinstance(o, str) for o in others)):
        raise TypeError(f"prompt must be a string and others a list of strings, got {prompt!r} and {others!r}")
    if not others:
        raise ValueError("others is empty: give at least one prompt to compare with")
    steps, seed = check_int(steps, "steps", minimum=1), check_seed(seed)
    scale = check_number(guidance_scale, "guidance_scale", minimum=0)
    conditioner = conditioner_for(pipe, guidance_scale=scale)
    key = conditioner.pooled_text_key
    if key is None:
        raise ValueError(
            f"{type(pipe).__name__} has no pooled text vector: its denoiser reads the prompt only through the K/V "
            "layers. conditioning_routes applies to SDXL, SD3 and Flux pipelines")
    denoiser = denoiser_of(pipe)
    start = conditioner.encode([prompt])
    latents, timesteps = conditioner.sample_trajectory(
        denoiser, start, conditioner.encode_unconditional(1), steps=steps, guidance_scale=scale,
        generator=torch.Generator().manual_seed(seed))
    x, t = latents[:, 0], timesteps

    def output(cond: Conditioning) -> torch.Tensor:
        # every variant is one batch of the same shape: identical inputs give bit-identical outputs
        return conditioner.predict(denoiser, x, t, cond.select([0] * len(t))).float()

    base = output(start)
    rows = []
    for other in others:
        target = conditioner.encode([other])
        pooled_only = Conditioning(start.hidden_states, {**start.added, key: target.added[key]})
        tokens_only = Conditioning(target.hidden_states, {**target.added, key: start.added[key]})
        full = (output(target) - base).flatten(1).norm(dim=1).sum()
        if full == 0:
            raise ValueError(f"{prompt!r} and {other!r} give the same output: there is no change to split")
        share = [float((output(c) - base).flatten(1).norm(dim=1).sum() / full) for c in (pooled_only, tokens_only)]
        rows.append(ConditioningRoutes(prompt, other, *share))
    return rows


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
