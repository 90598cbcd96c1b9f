"""Gradient projection: K/V outputs on the embeddings of concepts to keep do not move.

C's columns are the embeddings (``du.concept_embedding``) of the concepts to keep: the user's ``keep`` list,
every concept removed earlier, and the ``neighbors`` concepts of a vocabulary most similar to the target. Each K/V
weight update is restricted to the orthogonal complement of span(C): G -> G @ P, with
P = I - C (C^T C + eps I)^-1 C^T. Then dW @ c = 0 for every protected c:

* LoRA (dW = B A s): A starts in the complement, its gradient is projected and, because Adam's elementwise update
  leaves the subspace, A itself is projected back after every step.
* dense delta: the same on D's rows; when selective fine-tuning masks D, each row is projected inside its own
  allowed entries (masking a projected update would break the projection).

SD3 and Flux (joint transformer blocks): each block's ``add_k_proj`` / ``add_v_proj`` reads a different text
state, which depends on the timestep and, after the first block, on the image. There C is per layer: the states
that layer reads at the protected concepts' tokens (one column per protected prompt and sampled x_t, over the
x_t of the request's own trajectories; ``kv/text_states.py``). The first block's invariant is then exact at every
timestep of the sampler; for the later blocks it holds on the collected x_t and approximately on others
(``analysis.text_stream_change`` measures it on held-out x_t).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from .._validation import check_int, check_number, check_optional_number
from .._warn import warn
from ..embeddings import concept_embedding, concept_embeddings, cosine_similarities
from ..families.registry import conditioner_for, family_of
from ..prompts import DEFAULT_DOMAIN, TEMPLATES, check_concept, concept_prompts, same_concept
from ..kv.text_states import ProtectedPrompt, collect_block_states
from ..vocabulary import DEFAULT_VOCABULARY
from .base import Regularizer, TrainingContext, register_regularizer

CONDITION_LIMIT = 1e10


def complement_projector(columns: torch.Tensor, eps: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """P = I - C (C^T C + eps I)^-1 C^T for C = ``columns`` [d, m], in float64.

    eps defaults to max(1e-4, 1e-6 * trace(C^T C) / m); when C^T C itself is ill-conditioned (condition number
    above 1e10: columns nearly dependent) its pseudo-inverse is used instead, which projects exactly onto span(C).
    """
    c = columns.double()
    d, m = c.shape
    if m == 0:
        return torch.eye(d, dtype=torch.float64), {"eps": 0.0, "pseudo_inverse": False}
    gram = c.T @ c
    if eps is None:
        eps = max(1e-4, 1e-6 * float(torch.trace(gram)) / m)
    regularised = gram + eps * torch.eye(m, dtype=torch.float64)
    use_pinv = bool(torch.linalg.cond(gram) > CONDITION_LIMIT)
    inverse = torch.linalg.pinv(gram, hermitian=True) if use_pinv else torch.linalg.inv(regularised)
    return torch.eye(d, dtype=torch.float64) - c @ inverse @ c.T, {"eps": eps, "pseudo_inverse": use_pinv}


def masked_row_projectors(columns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row K_i = pinv(C^T diag(mask_i) C) [rows, m, m]: row i's projection inside its allowed entries is
    g_i - mask_i * (C K_i C^T g_i), which makes C^T (mask_i * g_i) exactly zero."""
    c = columns.double()
    m = c.shape[1]
    outer = (c[:, :, None] * c[:, None, :]).reshape(c.shape[0], m * m)  # [in, m*m]
    grams = (mask.double() @ outer).reshape(mask.shape[0], m, m)
    return torch.linalg.pinv(grams, hermitian=True)


def project_rows(tensor: torch.Tensor, columns: torch.Tensor, projector: torch.Tensor | None,
                 row_projectors: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Remove from each row of ``tensor`` [rows, in] its component along span(C) (inside the row's mask)."""
    if mask is None:
        return tensor @ projector
    # float64: the per-row Gram matrices of nearly parallel columns are ill-conditioned
    columns = columns.double()
    coefficients = torch.bmm(row_projectors, (tensor.double() @ columns)[:, :, None])[:, :, 0]
    return (tensor - (coefficients @ columns.T) * mask).to(tensor.dtype)


@dataclass
class _Protected:
    concept: str
    domain: str
    source: str  # "keep", "removed" or "neighbor"
    similarity: float | None = None


@register_regularizer
@dataclass
class GradientProjection(Regularizer):
    """Keep the K/V outputs of protected concepts fixed while the target is removed.

    Args:
        keep: concepts to keep, embedded in the request's domain (and in the plain "concept" templates, so that
            ``du.concept_embedding(pipe, c)`` is protected whichever domain it is asked for). Formerly ``retain``.
        neighbors: how many concepts of ``vocabulary`` most similar to the target to protect as well.
        threshold: only protect neighbours whose cosine similarity to the target is at least this.
        vocabulary: neighbour candidates, ``{domain: [concepts]}`` or a list (in the request's domain); default:
            the built-in styles and objects (``diffusers_unlearn.vocabulary.DEFAULT_VOCABULARY``).
        keep_earlier: protect every concept removed by an earlier request of the ledger, so that this request cannot
            bring it back. Formerly ``include_removed``.
        protect_unconditional: also keep the K/V outputs of the unconditional (empty) prompt's tokens fixed: the
            start token is the same in every prompt and the unconditional branch enters every image through
            classifier-free guidance, so an update that moves them moves every concept.
        dedup_cosine: drop a neighbour whose embedding's cosine with a column already in C exceeds this.
        warn_in_span: warn when more than this fraction of the target embedding's energy lies in span(C).
        samples_per_step: SD3 / Flux only: x_t per trajectory step on which each block's text states are collected
            (columns per layer = protected prompts x sampling steps x this). The empty prompt adds its start and
            end tokens only; its padding tokens are not protected on these models.
    """

    name: ClassVar[str] = "gradient_projection"
    order: ClassVar[int] = 10
    renamed_options: ClassVar[Mapping[str, str]] = {"retain": "keep", "include_removed": "keep_earlier"}

    keep: Sequence[str] = field(default_factory=list)
    neighbors: int = 8
    threshold: float | None = None
    vocabulary: Mapping[str, Sequence[str]] | Sequence[str] | None = None
    keep_earlier: bool = True
    protect_unconditional: bool = True
    dedup_cosine: float = 0.95
    warn_in_span: float = 0.9
    samples_per_step: int = 1

    def __post_init__(self) -> None:
        samples = self.samples_per_step
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"GradientProjection samples_per_step must be an integer >= 1, got {samples!r}")
        if isinstance(self.keep, str):
            self.keep = [self.keep]
        self.keep = [check_concept(c, "keep concept") for c in self.keep]
        check_int(self.neighbors, "GradientProjection neighbors", minimum=0)
        try:
            check_optional_number(self.threshold, "threshold", minimum=-1, maximum=1)
        except ValueError:
            raise ValueError(f"GradientProjection threshold must be a cosine similarity in [-1, 1], got "
                             f"{self.threshold!r}") from None
        check_number(self.dedup_cosine, "GradientProjection dedup_cosine", minimum=0, maximum=1, exclusive_minimum=True)
        check_number(self.warn_in_span, "GradientProjection warn_in_span", minimum=0, maximum=1, exclusive_minimum=True)
        if self.vocabulary is not None and not isinstance(self.vocabulary, (Mapping, Sequence)):
            raise TypeError(f"vocabulary must be a dict of domain -> concepts or a list, got {self.vocabulary!r}")
        if self.vocabulary is not None and not isinstance(self.vocabulary, Mapping):
            self.vocabulary = [check_concept(c, "vocabulary concept") for c in self.vocabulary]
        if not self.keep and self.neighbors == 0:
            warn("GradientProjection(keep=[], neighbors=0) keeps no concept of its own: only concepts removed "
                 "earlier (with an empty ledger it protects nothing)"
                 + (" and the unconditional prompt" if self.protect_unconditional else ""),
                 {"keep": [], "neighbors": 0})

    def check_request(self, concept: str, domain: str) -> None:
        """Refuse a keep list that names the concept being removed, before any model work.

        Args:
            concept: the concept this request removes.
            domain: its domain (unused here; part of the regularizer interface).

        Raises:
            ValueError: ``keep`` names ``concept``.
        """
        for kept in self.keep:
            if same_concept(kept, concept):
                raise ValueError(f"GradientProjection cannot keep {kept!r}: it is the concept being removed")

    # -------------------------------------------------------------------------------- which concepts
    def _candidates(self, domain: str) -> list[tuple[str, str]]:
        vocabulary = DEFAULT_VOCABULARY if self.vocabulary is None else self.vocabulary
        if isinstance(vocabulary, Mapping):
            return [(c, d) for d, concepts in vocabulary.items() for c in concepts]
        return [(c, domain) for c in vocabulary]

    def protected_concepts(self, ctx: TrainingContext) -> list[_Protected]:
        """The user's keep list, earlier removed concepts, then the target's nearest vocabulary neighbours.

        Args:
            ctx: the request's training context (pipeline, concept, domain, earlier requests).

        Returns:
            The concepts whose directions the projection protects, each with why it was chosen.
        """
        chosen: list[_Protected] = [_Protected(c, ctx.domain, "keep") for c in self.keep]
        removing = list(ctx.concepts or (ctx.concept,))  # a request of several concepts protects none of them
        if self.keep_earlier:
            chosen += [_Protected(c, r.domain, "removed") for r in ctx.earlier
                       for c in (getattr(r, "concepts", None) or (r.concept,))
                       if not any(same_concept(c, t) for t in removing)]
        if self.neighbors:
            taken = [p.concept for p in chosen] + removing
            pool = [(c, d) for c, d in self._candidates(ctx.domain) if not any(same_concept(c, t) for t in taken)]
            pool = list(dict.fromkeys(pool))
            if pool:
                target = concept_embedding(ctx.pipe, ctx.concept, ctx.domain)
                # one batched text-encoder pass per few hundred prompts, not one per candidate
                with tqdm(total=len(pool), desc="gradient projection: embedding neighbour candidates",
                          unit="concept", disable=not ctx.progress, leave=False) as bar:
                    embeds = concept_embeddings(ctx.pipe, pool)
                    bar.update(len(pool))
                sims = cosine_similarities(target, embeds)
                order = torch.argsort(sims, descending=True, stable=True)
                for i in order[: self.neighbors].tolist():
                    if self.threshold is not None and sims[i] < self.threshold:
                        break
                    chosen.append(_Protected(pool[i][0], pool[i][1], "neighbor", round(float(sims[i]), 4)))
        return chosen

    def _columns(self, ctx: TrainingContext, chosen: list[_Protected]) -> tuple[torch.Tensor, list[_Protected]]:
        """C's columns, and the concepts behind them. Concepts the user or the ledger names are always kept (their
        invariant must hold exactly); a neighbour nearly parallel to a kept column (cosine > dedup_cosine) adds
        nothing but ill-conditioning and is dropped."""
        kept: list[torch.Tensor] = []
        used: list[_Protected] = []
        for item in chosen:
            domains = [item.domain]
            if item.source != "neighbor" and item.domain != DEFAULT_DOMAIN:
                domains.append(DEFAULT_DOMAIN)
            vectors = [concept_embedding(ctx.pipe, item.concept, d) for d in domains]
            if item.source == "neighbor" and any(
                torch.nn.functional.cosine_similarity(v, k, dim=0) > self.dedup_cosine for v in vectors for k in kept
            ):
                continue
            kept += vectors
            used.append(item)
        self._unconditional_columns = 0
        if self.protect_unconditional:
            # Every position, near-duplicates included: a dropped one would not be kept exactly. The projector's
            # regularised inverse (or pseudo-inverse) copes with the near-dependence.
            for vector in conditioner_for(ctx.pipe).encode_unconditional(1).hidden_states[0].float().cpu():
                if vector.norm() > 0:
                    kept.append(vector)
                    self._unconditional_columns += 1
        d = ctx.base_weights[next(iter(ctx.base_weights))].shape[1]
        return (torch.stack(kept, dim=1) if kept else torch.zeros(d, 0)), used

    # -------------------------------------------------------------------------------------- hooks
    def setup(self, ctx: TrainingContext) -> None:
        """Choose the protected concepts and build each layer's projector onto their orthogonal complement.

        Args:
            ctx: the request's training context, with the adapter ready.

        Raises:
            ValueError: ``keep`` names the concept being removed.
        """
        self.check_request(ctx.concept, ctx.domain)
        chosen = self.protected_concepts(ctx)
        adapter = ctx.adapter
        if family_of(ctx.pipe).per_block_text_states:
            self._unconditional_columns = 0
            used = self._select(ctx, chosen)
            per_layer, in_span = self._block_columns(ctx, used)
        else:
            columns, used = self._columns(ctx, chosen)
            per_layer = {layer: columns for layer in adapter.layer_names}
            in_span = {layer: self._in_span(columns, concept_embedding(ctx.pipe, ctx.concept, ctx.domain))
                       for layer in adapter.layer_names[:1]}
        counts = sorted({int(c.shape[1]) for c in per_layer.values()})
        self._report = {
            "protected": [vars(p) for p in used],
            "columns": counts[-1] if counts else 0,
            "unconditional_columns": self._unconditional_columns,
            "target_in_span": round(max(in_span.values(), default=0.0), 6),
        }
        if not counts or counts[-1] == 0:
            warn(f"GradientProjection has nothing to protect while removing {ctx.concept!r}: the request is not "
                 "constrained", {"keep": list(self.keep), "neighbors": self.neighbors})
        in_span_max = self._report["target_in_span"]
        if in_span_max > self.warn_in_span:
            unconditional = (f" and {self._unconditional_columns} unconditional-prompt tokens"
                             if self._unconditional_columns else "")
            warn(f"{in_span_max:.0%} of the embedding of {ctx.concept!r} lies in the span of what gradient projection "
                 f"keeps ({len(used)} concepts{unconditional}): the request can only act on the remaining "
                 f"{1 - in_span_max:.0%}, so {ctx.concept!r} may stay partly visible. If it does, keep fewer concepts "
                 "(fewer neighbours or retained concepts) or train longer",
                 {"neighbors": self.neighbors, "keep": list(self.keep), "steps": None})

        device = adapter.input_factor(adapter.layer_names[0]).device
        self._active = bool(counts) and counts[-1] > 0
        self._columns_t: dict[str, torch.Tensor] = {}
        self._projector: dict[str, torch.Tensor] = {}
        self._row_projectors: dict[str, torch.Tensor] = {}
        shared: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = {}  # one projector per distinct C
        for layer in adapter.layer_names:
            columns = per_layer[layer]
            if id(columns) not in shared:
                projector, info = complement_projector(columns)
                shared[id(columns)] = (columns.to(device, torch.float32), projector.to(device, torch.float32), info)
            self._columns_t[layer], self._projector[layer], info = shared[id(columns)]
            if adapter.masks is not None and self._active:
                self._row_projectors[layer] = masked_row_projectors(columns, adapter.masks[layer].cpu()).to(device)
        infos = [info for _, _, info in shared.values()]
        self._report["eps"] = max((i["eps"] for i in infos), default=0.0)
        self._report["pseudo_inverse"] = any(i["pseudo_inverse"] for i in infos)
        if len(shared) > 1:
            self._report["columns_per_layer"] = {layer: int(c.shape[1]) for layer, c in per_layer.items()}
            self._report["target_in_span_per_layer"] = {layer: round(v, 6) for layer, v in in_span.items()}
        self._project_parameters(ctx)  # a LoRA's A starts in the complement of span(C)

    @staticmethod
    def _in_span(columns: torch.Tensor, target: torch.Tensor) -> float:
        """Share of ``target``'s energy (summed over its columns) inside span(columns)."""
        if columns.shape[1] == 0:
            return 0.0
        projector, _ = complement_projector(columns)
        target = target.double().reshape(projector.shape[0], -1)
        return float(1 - (projector @ target).square().sum() / target.square().sum())

    def _select(self, ctx: TrainingContext, chosen: list[_Protected]) -> list[_Protected]:
        """The protected concepts after dropping near-duplicate neighbours (by their concept embeddings)."""
        kept: list[torch.Tensor] = []
        used: list[_Protected] = []
        for item in chosen:
            vector = concept_embedding(ctx.pipe, item.concept, item.domain)
            if item.source == "neighbor" and any(
                torch.nn.functional.cosine_similarity(vector, k, dim=0) > self.dedup_cosine for k in kept
            ):
                continue
            kept.append(vector)
            used.append(item)
        return used

    def _block_columns(self, ctx: TrainingContext, used: list[_Protected]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-layer C for joint transformer blocks, and the share of the target's own states inside it."""
        objective = ctx.objective
        if not hasattr(objective, "latents") or not hasattr(objective, "timesteps"):
            raise ValueError(
                f"GradientProjection on {type(ctx.denoiser).__name__} collects each block's text states over the "
                f"request's sampled x_t; method {objective.config.method!r} samples no trajectories"
            )
        conditioner = objective.context.conditioner
        protected: list[ProtectedPrompt] = []
        for item in used:
            prompts = list(concept_prompts(item.concept, templates=TEMPLATES[item.domain]))
            protected += [ProtectedPrompt(p, pos) for p, pos in
                          zip(prompts, conditioner.concept_positions(prompts, item.concept))]
        if self.protect_unconditional:
            empty = conditioner.unconditional_positions()
            protected += [ProtectedPrompt("", [i]) for i in empty]
            self._unconditional_columns = len(empty) * objective.latents.shape[0] * min(
                self.samples_per_step, objective.latents.shape[1])
        target_prompts = list(concept_prompts(ctx.concept, templates=TEMPLATES[ctx.domain]))
        targets = [ProtectedPrompt(p, pos) for p, pos in
                   zip(target_prompts, conditioner.concept_positions(target_prompts, ctx.concept))]
        layers = ctx.adapter.layer_names
        states = collect_block_states(conditioner, ctx.denoiser, layers, protected + targets, objective.latents,
                                      objective.timesteps, self.samples_per_step, objective.context.frozen)
        count, per_x = len(protected), len(protected) + len(targets)
        columns, in_span = {}, {}
        for layer in layers:
            # columns come grouped by x_t: [protected..., targets...] for each sample
            blocks = states[layer].split(per_x, dim=1)
            columns[layer] = torch.cat([b[:, :count] for b in blocks], dim=1) if count else \
                torch.zeros(states[layer].shape[0], 0)
            in_span[layer] = self._in_span(columns[layer], torch.cat([b[:, count:] for b in blocks], dim=1))
        return columns, in_span

    def _project(self, layer: str, tensor: torch.Tensor, ctx: TrainingContext) -> torch.Tensor:
        mask = None if ctx.adapter.masks is None else ctx.adapter.masks[layer]
        return project_rows(tensor, self._columns_t[layer], self._projector[layer], self._row_projectors.get(layer),
                            mask)

    def transform_gradients(self, ctx: TrainingContext) -> None:
        """Project each input factor's gradient so the step cannot move the protected concepts' outputs.

        Args:
            ctx: the request's training context.
        """
        if not self._active:
            return
        for layer in ctx.adapter.layer_names:
            param = ctx.adapter.input_factor(layer)
            if param.grad is not None:
                param.grad.copy_(self._project(layer, param.grad, ctx))

    @torch.no_grad()
    def _project_parameters(self, ctx: TrainingContext) -> None:
        if not self._active:
            return
        for layer in ctx.adapter.layer_names:
            param = ctx.adapter.input_factor(layer)
            param.copy_(self._project(layer, param, ctx))

    def after_step(self, ctx: TrainingContext) -> None:
        """Project the input factors back into the allowed subspace, which Adam's update can leave.

        Args:
            ctx: the request's training context.
        """
        self._project_parameters(ctx)  # Adam's elementwise update leaves the subspace; bring A (or D) back

    def report(self) -> dict[str, Any]:
        """What was protected and how, for the request's ledger record.

        Returns:
            A JSON-able copy of the figures gathered in ``setup``.
        """
        return dict(self._report)
