"""Closed-form, ledger-aware erasure: the smallest K/V change that maps a concept onto an anchor (UCE-style).

For every cross-attention K/V weight, with W0 the base weight and W the current one (earlier requests folded in),
the request's change D solves, in float64 and with no training loop:

1. protected set P (kept/auxiliary concepts' embeddings and the empty prompt's tokens, all of them on UNets, the
   start and end tokens on SD3 / Flux, whose hundreds of padding tokens would fill the space):
   (W + D) p = W0 p, exactly on span(P) (a hard constraint: D lives in the complement of span(P) apart from the
   correction that brings P back to its base outputs);
2. inside that complement, least squares with a small ridge over token pairs (c, a): the new concept's tokens c map
   to the anchor's outputs W0 a (the concept's last token and every token after it, paired with the anchor
   prompt's tokens at the same offset, as UCE does), and so does every concept removed earlier (read from the
   ledger, each with its own anchor), so request 12 cannot undo request 3.

Options measured on MiniCanvas (docs/benchmarks.md section 8): ``negative_guidance`` g aims each key past its
anchor, at W0 (a + g (a - c)), as ESD's negative guidance does for noise predictions; it erases where the anchor's own
images resemble the concept (an empty style slot can). ``protection="soft"`` drops the hard constraint on the kept
concepts' average embeddings and keeps only UCE's soft penalty on their tokens (the empty prompt stays exact).
``map_every_token`` (default) maps each of the concept's tokens, its first words included.

When the target lies almost inside span(P) (the 512-wide MiniCanvas with the built-in vocabulary keeps 99.5% of
``neon lines``' energy in the span, ``target_in_span`` 0.995; the earlier 64-wide one left about 3% outside) only
that residual can carry the erasure;
the solve still maps it (a larger edit), and the ledger records how much of the target was in the span.

The solve (basis, eigendecomposition, inverse) runs in float64; its factors are applied to each float32 weight in
float32. The result is stored exactly as LoRA factors D = B @ A (A: the solve's directions, rank <= the free
directions; an identity factor once that rank reaches min(out, in)), so the ledger, audit, fold, merge and LoRA
export treat it like any trained request. Rolling back a request re-solves the closed-form requests after it
(``resolve_after_rollback``), since each was solved on top of, and keeping, the ones before it.

SD3 and Flux: only the first joint block is solved. UCE assumes each K/V layer reads token states fixed by the
prompt, so that keys, anchors and kept states are the states the layer will see. A UNet's cross-attention meets it
at every block and timestep. In a joint transformer the first block's ``add_k_proj`` / ``add_v_proj`` read the
context embedder's output normalised and modulated by the timestep and the pooled text: no image enters, but it
depends on t. Every later block reads a text stream that has attended to the image and to the earlier blocks' K/V,
which this very edit changes, so its keys are not fixed by the prompt (collecting them over sampled x_t, as
gradient projection does, would make the invariants hold on those x_t only). The solve therefore reads the first
block's states (``text_states.PromptStates``, without sampling an image) at each timestep the pipeline's sampler
visits in ``sampling_steps`` steps (``resolution`` too: Flux shifts its schedule by the image size), and stores zero
changes for the later blocks' layers (``ModelFamily.prompt_only_layers``). Its invariants are exact at those
timesteps: solve with ``sampling_steps`` equal to the deployment's ``num_inference_steps`` and they hold at every
step of every generation; at other timesteps they hold approximately (measured in docs/deploy.md). Kept concepts
take one column per tokenizer segment (SD3: CLIP, then T5) and timestep, so keep the vocabulary well below
width / (segments x steps) kept concepts; the solve warns when nothing is left to edit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._validation import check_number
from ..adapters import RequestAdapter, identity_factors
from ..conditioning import _find_sublist
from ..families import family_of
from ..prompts import TEMPLATES, check_concept, provide_domain, same_concept
from ..text_states import PromptStates
from ..vocabulary import DEFAULT_VOCABULARY
from .base import Objective, ObjectiveConfig, register_objective, swap_concept

logger = logging.getLogger(__name__)

SPAN_RTOL = 1e-8  # singular values of P below this fraction of the largest: directions P does not use
KEY_RTOL = 1e-12  # eigenvalues of the projected key covariance below this fraction of the largest: numerical zero
PROTECTIONS = ("span", "soft")


@dataclass
class ClosedFormConfig(ObjectiveConfig):
    """Args:
    anchor: what the concept's tokens should produce instead: "" (default: the empty slot, "an image in style"),
        or a domain anchor such as "painting". Anchor prompts are the request's prompts with the concept swapped.
    preserve: concepts whose K/V outputs must stay at the base model's (embedded in the request's domain).
    vocabulary: auxiliary concepts kept too, ``{domain: [concepts]}`` or a list (request's domain); default the
        built-in styles and objects. The target and every concept removed earlier are left out.
    protect_unconditional: keep every token of the empty prompt at its base outputs (it enters every image through
        classifier-free guidance).
    include_earlier: keep every earlier removal of the ledger mapped to its anchor.
    concept_weight: weight of the new concept's token pairs in the least squares (against the kept concepts'
        ``preserve_weight``).
    earlier_weight: weight of each earlier removal's token pairs against the new concept's in the least squares:
        where both compete for the same free directions, the earlier removals win.
    preserve_weight: weight of each token of the kept concepts' prompts (every token from the concept on, in every
        template of its domain) in a soft penalty on its output change: span(P) holds each kept concept's average
        vector exactly, this keeps its individual tokens close too (UCE's preservation term).
    protection: "span" (exact on the kept concepts' average embeddings, soft on their tokens) or "soft" (only the soft
        penalty on the kept concepts' tokens, UCE's form; the empty prompt stays exact either way).
    map_every_token: map each of the concept's tokens onto the anchor (default); False: its last token and the
        ones after it only, as UCE does (on a 2-word style the first word, e.g. the palette, then survives).
    negative_guidance: g >= 0; each mapped token c aims at W0 (a + g (a - c)) instead of W0 a: past the anchor, away
        from the concept, as ESD's negative guidance does for noise predictions (an anchor whose own images
        resemble the concept, as an empty style slot can, then still erases).
    ridge: Tikhonov weight of the mapping solve, relative to the mean eigenvalue of its key covariance: bounds the
        edit when the concept's part outside the protected span is tiny (0: exact least squares).
    max_kept_fraction: None (default): every kept state is held exactly, even when together they span the whole K/V
        input (then the request changes nothing, and says so). A fraction f in (0, 1): the exactly kept span is
        capped at f x the input width, its strongest directions (the rest are kept by the soft penalty only), so a
        model with a narrow text space keeps room to erase. The recommended recipe uses ``RECOMMENDED_KEPT_FRACTION``.
    sampling_steps, guidance_scale, num_trajectories: used only by the erasure check's trajectories.
    """

    method: ClassVar[str] = "closed_form"
    closed_form: ClassVar[bool] = True  # the trainer solves it instead of running a training loop
    anchor: str = ""
    preserve: Sequence[str] = field(default_factory=list)
    vocabulary: Mapping[str, Sequence[str]] | Sequence[str] | None = None
    protect_unconditional: bool = True
    include_earlier: bool = True
    # concept_weight 10 (the new concept weighs as much as each earlier removal), preserve_weight 0.5 and
    # negative_guidance 1: the MiniCanvas bench's best over 12 requests (docs/benchmarks.md section 8): every removal
    # erased, in held-out wordings too, with the kept styles and the objects at base. Relative to a mapped token a
    # kept one weighs 0.05; UCE's plain form is preserve 0.1, guidance 0.
    concept_weight: float = 10.0
    earlier_weight: float = 10.0
    preserve_weight: float = 0.5
    protection: str = "span"
    map_every_token: bool = True
    negative_guidance: float = 1.0
    ridge: float = 1e-4
    max_kept_fraction: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_kept_fraction is not None:
            check_number(self.max_kept_fraction, "max_kept_fraction", minimum=0, maximum=1, exclusive_minimum=True,
                         exclusive_maximum=True)
        if not isinstance(self.anchor, str):
            raise TypeError(f"anchor must be a string ('' for the empty slot), got {self.anchor!r}")
        self.anchor = " ".join(self.anchor.split())
        if isinstance(self.preserve, str):
            self.preserve = [self.preserve]
        self.preserve = [check_concept(c, "preserve concept") for c in self.preserve]
        if self.vocabulary is not None:
            if isinstance(self.vocabulary, Mapping):
                self.vocabulary = {str(d): [check_concept(c, "vocabulary concept") for c in cs]
                                   for d, cs in self.vocabulary.items()}
            elif isinstance(self.vocabulary, Sequence) and not isinstance(self.vocabulary, str):
                self.vocabulary = [check_concept(c, "vocabulary concept") for c in self.vocabulary]
            else:
                raise TypeError(f"vocabulary must be a dict of domain -> concepts or a list, got {self.vocabulary!r}")
        for name in ("protect_unconditional", "include_earlier", "map_every_token"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, strict in (("concept_weight", True), ("earlier_weight", True), ("preserve_weight", False),
                             ("negative_guidance", False)):
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not value < float("inf")
            if bad or value < 0 or (strict and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")
        if self.protection not in PROTECTIONS:
            raise ValueError(f"protection must be one of {list(PROTECTIONS)}, got {self.protection!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not 0 <= self.ridge < float("inf"):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")

    def check_regularizers(self, regularizers: Sequence[Any]) -> None:
        if regularizers:
            names = [getattr(r, "name", type(r).__name__) for r in regularizers]
            raise ValueError(
                f"method 'closed_form' takes no regularizers (got {names}): it trains nothing for a drift penalty, "
                "mask or gradient projection to act on. Its protection is built in: pass preserve=[...] and "
                "vocabulary=... for the concepts to keep; earlier removals are kept from the ledger"
            )


class ClosedFormObjective(Objective):
    """Registered so that ``method="closed_form"`` validates like any method; the trainer calls ``solve``."""

    def prepare(self) -> None:
        raise TypeError("closed_form is solved, not trained: train_request calls closed_form.solve for it")

    def training_loss(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        raise TypeError("closed_form has no training loss")

    def trajectory_losses(self):  # type: ignore[override]
        raise TypeError("closed_form has no trajectory losses")


# ------------------------------------------------------------------------------------------ token pairs
def default_states(pipe: Any) -> PromptStates:
    """The token states a request with the default settings solves on (the default sampling steps' timesteps)."""
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
    it) and the empty prompt's tokens; the (concept, domain) pairs behind them."""
    states = default_states(pipe) if states is None else states
    vocabulary = DEFAULT_VOCABULARY if config.vocabulary is None else config.vocabulary
    if isinstance(vocabulary, Mapping):
        candidates = [(c, d) for d, cs in vocabulary.items() for c in cs if provide_domain(d)]
    else:
        candidates = [(c, domain) for c in vocabulary]
    candidates = [(c, domain) for c in config.preserve] + candidates
    taken = [concept, *removed]
    chosen = list(dict.fromkeys((c, d) for c, d in candidates if not any(same_concept(c, t) for t in taken)))
    from tqdm.auto import tqdm

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
    trained)."""
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
    after it (see ``concept_states``)."""
    return concept_states(pipe, concept, domain, states)[0]


# ------------------------------------------------------------------------------------------------ solve
@dataclass
class Solver:
    """The layer-independent part of the solve (every K/V layer reads the same text keys): the protected basis and
    the ridge-regularised inverse of the mapping keys' covariance in its complement, as low-rank factors."""

    protected: torch.Tensor  # [d, r] orthonormal basis of span(P)
    anchor_factor: torch.Tensor  # [d, f]: A^T X_F K^-1 (anchor keys A, keys X in free coordinates X_F)
    key_factor: torch.Tensor  # [d, f]: X^T X_F K^-1
    directions: torch.Tensor  # [d, f]: F, orthonormal basis of the complement of span(P)
    # [d, f]: (preserve_weight P^T P_F + lambda F) K^-1: pulls what earlier requests moved back towards the base
    offset_factor: torch.Tensor | None = None

    @classmethod
    def build(cls, protected: torch.Tensor, mappings: Sequence[tuple[torch.Tensor, torch.Tensor]],
              ridge: float, weights: Sequence[float] | None = None, preserve: torch.Tensor | None = None,
              preserve_weight: float = 0.0) -> Solver:
        """``weights``: one per mapping (default 1), multiplying its token pairs' squared errors. ``preserve``
        [m, d]: token states whose outputs should move little (soft, weight ``preserve_weight`` each).

        Minimises sum w ||(W + D) x - W0 a||^2 + preserve_weight sum ||(W + D - W0) p||^2 + lambda ||W + D - W0||^2
        over D = Z F^T (so D q = 0 on span(P)), with W = W0 + E the current weight (earlier requests E):
        Z = (W0 A^T - W X^T) X_F K^-1 - E (preserve_weight P^T P_F + lambda F) K^-1 with
        K = X_F^T X_F + preserve_weight P_F^T P_F + lambda I, lambda = ridge * trace(X_F^T X_F) / f.
        The penalties are on the whole edit, not on this request's share: the kept tokens' outputs are held at the
        base model's, so request 12's result is the joint solve of all 12 from the base, and the kept concepts'
        small soft-penalty errors do not add up over a stream."""
        d = protected.shape[0]
        q = _basis(protected)
        if q.shape[1]:
            u, _, _ = torch.linalg.svd(protected, full_matrices=True)
            free = u[:, q.shape[1]:]
        else:
            free = torch.eye(d, dtype=torch.float64)
        empty = torch.zeros(d, 0, dtype=torch.float64)
        if not mappings or free.shape[1] == 0:
            return cls(q, empty, empty, empty)
        weights = [1.0] * len(mappings) if weights is None else list(weights)
        roots = [float(w) ** 0.5 for w in weights]  # sqrt(w) on both sides of a pair weights its squared error by w
        keys = torch.cat([r * k for r, (k, _) in zip(roots, mappings)]).double()
        anchors = torch.cat([r * a for r, (_, a) in zip(roots, mappings)]).double()
        coords = keys @ free  # [n, f]: the keys' part outside span(P), all the solve may act on
        system = coords.T @ coords
        energy = float(torch.trace(system))
        if energy <= KEY_RTOL * float(keys.square().sum()):
            return cls(q, empty, empty, empty)  # the keys lie inside span(P): nothing may move
        lam = ridge * energy / free.shape[1]
        pull = lam * free  # [d, f]
        if preserve is not None and len(preserve) and preserve_weight > 0:
            kept = preserve.double() @ free
            system = system + preserve_weight * (kept.T @ kept)
            pull = pull + preserve_weight * (preserve.double().T @ kept)
        system = system + lam * torch.eye(free.shape[1], dtype=torch.float64)
        inverse = torch.linalg.pinv(system, hermitian=True)  # K symmetric; ridge 0 with few keys leaves it singular
        solved = coords @ inverse  # [n, f] = X_F K^-1
        return cls(q, anchors.T @ solved, keys.T @ solved, free, pull @ inverse)

    def to(self, dtype: torch.dtype) -> Solver:
        offset = None if self.offset_factor is None else self.offset_factor.to(dtype)
        return Solver(*(t.to(dtype) for t in (self.protected, self.anchor_factor, self.key_factor, self.directions)),
                      offset)

    def layer_factors(self, base: torch.Tensor, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d], B [out, r]) with D = B @ A the change of one weight whose current value is ``base + offset``
        (``offset`` None: the base itself), in the solver's dtype."""
        dtype = self.directions.dtype
        w0 = base.to(dtype)
        off = None if offset is None else offset.to(dtype)
        a_parts, b_parts = [], []
        q = self.protected
        drift = None
        if q.shape[1] and off is not None:
            # bring P back to its base outputs (a no-op unless a trained request moved them): min-norm on span(P)
            drift = -(off @ q)
            if drift.abs().max() > 1e-6 * max(float(w0.abs().max()), 1e-30):
                a_parts.append(q.T)
                b_parts.append(drift)
            else:
                drift = None
        if self.directions.shape[1]:
            # B = W0 Fa - (W0 + E) Fk - E Fo with E = off + drift q^T, without forming the current weight
            b = w0 @ (self.anchor_factor - self.key_factor)
            on_offset = self.key_factor if self.offset_factor is None else self.key_factor + self.offset_factor
            if off is not None:
                b = b - off @ on_offset
            if drift is not None:
                b = b - drift @ (q.T @ on_offset)
            a_parts.append(self.directions.T)
            b_parts.append(b)
        if not a_parts:
            return torch.zeros(1, w0.shape[1], dtype=dtype), torch.zeros(w0.shape[0], 1, dtype=dtype)
        return torch.cat(a_parts), torch.cat(b_parts, dim=1)

    def layer_delta(self, base: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """D [out, d] for one weight."""
        a, b = self.layer_factors(base, offset)
        return b @ a


def cap_kept_span(protected: torch.Tensor, fraction: float | None) -> tuple[torch.Tensor, int | None]:
    """``protected`` [d, m], or its strongest ``fraction * d`` directions (scaled by their singular values) when it
    spans more; with the rank it had when capped (None when left as it is)."""
    if fraction is None or not protected.shape[1]:
        return protected, None
    limit = max(1, int(fraction * protected.shape[0]))
    u, s, _ = torch.linalg.svd(protected, full_matrices=False)
    rank = int((s > SPAN_RTOL * s[0]).sum())
    if rank <= limit:
        return protected, None
    logger.info("closed_form: the kept states span %d of %d input directions; holding the strongest %d exactly "
                "(max_kept_fraction=%s)", rank, protected.shape[0], limit, fraction)
    return u[:, :limit] * s[:limit], rank


def _basis(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [d, r] of span(columns), dropping directions below SPAN_RTOL of the largest."""
    if columns.shape[1] == 0:
        return columns
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    return u[:, s > SPAN_RTOL * s[0]]


def compact_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B) with the same product: kept as they are below rank min(out, in), otherwise the product with an
    identity factor (rank min(out, in), like a dense delta), so that stacked requests stay cheap."""
    if a.shape[0] >= min(b.shape[0], a.shape[1]):
        a, b = identity_factors(b @ a)
    return a.float().contiguous(), b.float().contiguous()


@dataclass
class EarlierRequest:
    """What the solve needs of an earlier request: its concept, domain, prompts and anchor, and, for an earlier
    closed-form request, the mapping it was solved with (None: the current request's)."""

    concept: str
    domain: str
    prompts: list[str]
    anchor: str
    negative_guidance: float | None = None
    map_every_token: bool | None = None


def earlier_requests(records: Sequence[Any]) -> list[EarlierRequest]:
    """Earlier removals from ledger records; a record's anchor is its method's anchor ("" for ESD-like methods). An
    earlier closed-form request keeps its own guidance and token mapping, so that a later request with other
    settings keeps it where it was solved; other methods' records are mapped with the current request's."""
    out = []
    for record in records:
        config = getattr(record, "method_config", None) or {}
        anchor = config.get("anchor") or ""
        prompts = list(getattr(record, "prompts", None) or [])
        own = getattr(record, "method", None) == ClosedFormConfig.method
        out.append(EarlierRequest(record.concept, record.domain, prompts, " ".join(str(anchor).split()),
                                  config.get("negative_guidance") if own else None,
                                  config.get("map_every_token") if own else None))
    return out


def solve(pipe: Any, *, concept: str, domain: str, prompts: Sequence[str], config: ClosedFormConfig,
          base_weights: Mapping[str, torch.Tensor], start_offsets: Mapping[str, torch.Tensor] | None,
          earlier: Sequence[Any], progress: bool = False) -> tuple[RequestAdapter, dict[str, Any]]:
    """One request's artifact and a report (protected concepts, share of the target in the protected span)."""
    if same_concept(config.anchor, concept):
        raise ValueError(f"anchor {config.anchor!r} is the concept being removed")
    earlier_list = earlier_requests(earlier)
    removed = [e.concept for e in earlier_list]
    layers = list(base_weights)
    family = family_of(pipe)
    solved_layers = family.prompt_only_layers(layers)  # every UNet layer; the first joint block's
    states = PromptStates.for_pipeline(pipe, layers, steps=config.sampling_steps, guidance_scale=config.guidance_scale,
                                       resolution=config.resolution)
    per_t = family.per_block_text_states  # joint blocks modulate the text by t: kept states per solve timestep
    protected, chosen = protected_columns(pipe, concept, domain, config, removed, states, progress=progress)
    protected, uncapped_rank = cap_kept_span(protected, config.max_kept_fraction)
    names = [c for c, _ in chosen]
    preserve = (torch.cat([concept_tokens(pipe, c, d, states) for c, d in chosen])
                if chosen and config.preserve_weight > 0 else None)
    mappings = [mapping_keys(pipe, concept, config.anchor, prompts, config.map_every_token, config.negative_guidance,
                             states)]
    skipped = []
    if config.include_earlier:
        for item in earlier_list:
            if same_concept(item.concept, concept) or not item.prompts:
                continue
            try:
                mappings.append(mapping_keys(
                    pipe, item.concept, item.anchor, item.prompts,
                    config.map_every_token if item.map_every_token is None else item.map_every_token,
                    config.negative_guidance if item.negative_guidance is None else item.negative_guidance, states))
            except ValueError:
                skipped.append(item.concept)  # e.g. a simultaneous retraining "a+b": no single concept to map
    if skipped:
        warnings.warn(f"earlier removals {skipped} name no concept inside their prompts: not kept mapped", stacklevel=3)
    tensors, scales = {}, {}
    from tqdm.auto import tqdm

    weights = [config.concept_weight] + [config.earlier_weight] * (len(mappings) - 1)
    solver = Solver.build(protected, mappings, config.ridge, weights, preserve, config.preserve_weight)
    width, kept_rank = solver.protected.shape
    if not solver.directions.shape[1]:
        why = (f"what it keeps fills the K/V layers' {width}-wide input space ({protected.shape[1]} kept states)"
               if kept_rank >= width else f"the states of {concept!r} lie inside the span of what it keeps")
        warnings.warn(f"closed_form changes nothing while removing {concept!r}: {why}. Keep fewer concepts "
                      f"(vocabulary=, preserve=){' or solve on fewer timesteps (sampling_steps=)' if per_t else ''}, "
                      f"or hold only part of them exactly (max_kept_fraction=0.75, the recommended recipe's)",
                      stacklevel=3)
    # Applied to each float32 weight in float32: the factors are stored in float32 anyway, and it halves the cost.
    applied = solver.to(torch.float32)
    for layer in tqdm(layers, desc=f"solving {concept!r}", disable=not progress, leave=False):
        base = base_weights[layer].detach().cpu()
        if layer in solved_layers:
            offset = start_offsets[layer].detach().cpu() if start_offsets else None
            a, b = compact_factors(*applied.layer_factors(base, offset))
        else:  # reads image-dependent states (later joint blocks): left as it is, stored as a zero change
            a, b = torch.zeros(1, base.shape[1]), torch.zeros(base.shape[0], 1)
        tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = a, b
        scales[layer] = 1.0
    q = solver.protected
    target = concept_states(pipe, concept, domain, states)[1].T  # [d, S * T]
    in_span = float((q.T @ target).square().sum() / target.square().sum()) if q.shape[1] else 0.0
    report = {"protected": names, "protected_columns": int(protected.shape[1]), "protected_rank": int(q.shape[1]),
              "target_in_span": round(in_span, 6), "earlier_mapped": len(mappings) - 1,
              "solve_rank": int(solver.directions.shape[1]), "ridge": config.ridge,
              "solved_layers": len(solved_layers)}
    if uncapped_rank is not None:
        report["protected_rank_uncapped"] = uncapped_rank
    return RequestAdapter("lora", tensors, scales), report


def resolve_after_rollback(pipe: Any, state: Any, position: int) -> dict[str, RequestAdapter]:
    """New artifacts for the closed-form requests at ``position`` and after, re-solved in ledger order on the
    requests that remain (each on top of those before it, keeping them mapped). Returns {request_id: artifact};
    the caller swaps them in. Requests of other methods keep their stored artifacts."""
    from ..composition import combined_deltas
    from ..merging import MergeStrategy
    from ..objectives import build_objective_config

    records = state.ledger.requests
    artifacts = dict(state.artifacts)
    replaced: dict[str, RequestAdapter] = {}
    for index in range(position, len(records)):
        record = records[index]
        if record.method != ClosedFormConfig.method:
            continue
        options = {k: v for k, v in record.method_config.items() if k != "method"}
        config = build_objective_config(ClosedFormConfig.method, options)
        # sequential: solved on top of the requests before it; merge strategies solve every request from the base
        before = [] if isinstance(state.strategy, MergeStrategy) else [artifacts[r.request_id] for r in records[:index]]
        adapter, _ = solve(pipe, concept=record.concept, domain=record.domain, prompts=record.prompts,
                           config=config, base_weights=state.base_weights,
                           start_offsets=combined_deltas(before, "sequential"), earlier=records[:index])
        artifacts[record.request_id] = replaced[record.request_id] = adapter
    return replaced


register_objective(ClosedFormConfig, ClosedFormObjective)
