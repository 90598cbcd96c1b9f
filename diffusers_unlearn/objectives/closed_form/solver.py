"""The solve: the smallest K/V change that maps the keys onto their anchors while the protected states keep their
base outputs, as low-rank factors."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ..._validation import check_number
from ...kv.adapters import RequestAdapter, identity_factors, smaller_form
from ...families.registry import family_of
from ...prompts import TEMPLATES, same_concept
from ...kv.text_states import PromptStates
from .config import ClosedFormConfig
from .siblings import sibling_tokens
from .keys import concept_states, concept_tokens, earlier_requests, mapping_keys, protected_columns

logger = logging.getLogger(__name__)

SPAN_RTOL = 1e-8  # singular values of P below this fraction of the largest: directions P does not use
KEY_RTOL = 1e-12  # eigenvalues of the projected key covariance below this fraction of the largest: numerical zero
ADVERSARIAL_RIDGE = 0.1  # pull of the adversarial embedding towards the attacked key, relative (adversarial_map)
CAPACITY_FRACTION = 0.95  # Solver.occupancy at which check_capacity warns (see there)


@dataclass
class Solver:
    """The layer-independent part of the solve (every K/V layer reads the same text keys): the protected basis and
    the ridge-regularised inverse of the mapping keys' covariance in its complement, as low-rank factors.

    Attributes:
        protected: [d, r] orthonormal basis of span(P).
        anchor_factor: [d, f]: A^T X_F K^-1 (anchor keys A, keys X in free coordinates X_F).
        key_factor: [d, f]: X^T X_F K^-1.
        directions: [d, f]: F, orthonormal basis of the complement of span(P).
        offset_factor: [d, f]: (keep_weight P^T P_F + lambda F) K^-1, which pulls what earlier requests moved back
            towards the base (None: no pull).
        exact_inverse: K was positive definite (a ridge > 0) and inverted exactly, so that the weight after the
            change is W0 (I + G) whatever the earlier requests did (``dense_change``).
        change_map: G [d, d] = (anchor_factor - key_factor) F^T, computed on first use by ``dense_change``.
        mapped_rank: how many directions of F the mapped keys (the new concept's and every earlier removal's) hold:
            eigenvalues of X_F^T X_F above the ridge lambda (below it the ridge, not the mapping, sets the change,
            which maps less than half of such a direction); with the protected rank, what ``occupancy`` counts.
    """

    protected: torch.Tensor  # [d, r] orthonormal basis of span(P)
    anchor_factor: torch.Tensor  # [d, f]: A^T X_F K^-1 (anchor keys A, keys X in free coordinates X_F)
    key_factor: torch.Tensor  # [d, f]: X^T X_F K^-1
    directions: torch.Tensor  # [d, f]: F, orthonormal basis of the complement of span(P)
    # [d, f]: (keep_weight P^T P_F + lambda F) K^-1: pulls what earlier requests moved back towards the base
    offset_factor: torch.Tensor | None = None
    exact_inverse: bool = False  # K is positive definite (ridge > 0) and inverted exactly: see dense_change
    change_map: torch.Tensor | None = field(default=None, repr=False)  # [d, d] G, built on first use
    mapped_rank: int = 0  # directions of F the mapped keys hold above the ridge (see occupancy)

    @classmethod
    def build(cls, protected: torch.Tensor, mappings: Sequence[tuple[torch.Tensor, torch.Tensor]],
              ridge: float, weights: Sequence[float] | None = None, keep: torch.Tensor | None = None,
              keep_weight: float = 0.0, keep_gram: torch.Tensor | None = None) -> Solver:
        """Factor the solve for a protected set and the token pairs to map.

        Minimises sum w ||(W + D) x - W0 a||^2 + keep_weight sum ||(W + D - W0) p||^2 + lambda ||W + D - W0||^2
        over D = Z F^T (so D q = 0 on span(P)), with W = W0 + E the current weight (earlier requests E):
        Z = (W0 A^T - W X^T) X_F K^-1 - E (keep_weight P^T P_F + lambda F) K^-1 with
        K = X_F^T X_F + keep_weight P_F^T P_F + lambda I, lambda = ridge * trace(X_F^T X_F) / f.
        The penalties are on the whole edit, not on this request's share: the kept tokens' outputs are held at the
        base model's, so request 12's result is the joint solve of all 12 from the base, and the kept concepts'
        small soft-penalty errors do not add up over a stream.

        Args:
            protected: P [d, m], the states whose outputs stay exactly at the base.
            mappings: (keys [n, d], target keys [n, d]) pairs, float64 (``keys.mapping_keys``).
            ridge: lambda relative to the mean eigenvalue of the keys' covariance outside span(P).
            weights: one per mapping (default 1), multiplying its token pairs' squared errors.
            keep: [m, d]: token states whose outputs should move little (soft).
            keep_weight: the soft penalty's weight on each row of ``keep``.
            keep_gram: [d, d] float64: keep^T keep, given instead of ``keep`` (``kept_gram`` caches it across a
                stream's requests, whose kept concepts rarely change).

        Returns:
            The solver; with empty factors when there is nothing to map or no direction left to move.
        """
        d = protected.shape[0]
        if protected.shape[1]:
            u, s, _ = torch.linalg.svd(protected, full_matrices=True)  # one SVD: the basis and its complement
            rank = int((s > SPAN_RTOL * s[0]).sum())
            q, free = u[:, :rank], u[:, rank:]
        else:
            q, free = protected, torch.eye(d, dtype=torch.float64)
        empty = torch.zeros(d, 0, dtype=torch.float64)
        if not mappings or free.shape[1] == 0:
            return cls(q, empty, empty, empty)
        weights = [1.0] * len(mappings) if weights is None else list(weights)
        roots = [float(w) ** 0.5 for w in weights]  # sqrt(w) on both sides of a pair weights its squared error by w
        keys = torch.cat([r * k for r, (k, _) in zip(roots, mappings)]).double()
        anchors = torch.cat([r * a for r, (_, a) in zip(roots, mappings)]).double()
        # X^T X and A^T X in the input space (2 n d^2 operations), then moved to the free coordinates (d^3): cheaper
        # than products through the n x f coordinates once there are more token pairs than input dimensions
        key_gram = keys.T @ keys
        on_free = key_gram @ free  # [d, f] = X^T X_F
        system = free.T @ on_free
        energy = float(torch.trace(system))
        if energy <= KEY_RTOL * float(torch.trace(key_gram)):
            return cls(q, empty, empty, empty)  # the keys lie inside span(P): nothing may move
        lam = ridge * energy / free.shape[1]
        spectrum = torch.linalg.eigvalsh(system)
        mapped_rank = int((spectrum > max(lam, KEY_RTOL * float(spectrum[-1]))).sum())
        pull = lam * free  # [d, f]
        if keep_gram is None and keep is not None and len(keep):
            keep_gram = keep.double().T @ keep.double()
        if keep_gram is not None and keep_weight > 0:
            kept = keep_gram.double() @ free  # [d, f] = P^T P_F
            system = system + keep_weight * (free.T @ kept)
            pull = pull + keep_weight * kept
        system = system + lam * torch.eye(free.shape[1], dtype=torch.float64)
        inverse = _inverse(system, lam > 0)
        cross = (anchors.T @ keys) @ free  # [d, f] = A^T X_F
        return cls(q, cross @ inverse, on_free @ inverse, free, pull @ inverse, lam > 0, mapped_rank=mapped_rank)

    def to(self, dtype: torch.dtype) -> Solver:
        """The same solver with every factor cast to ``dtype``.

        Args:
            dtype: the dtype of the returned factors.

        Returns:
            A new ``Solver``.
        """
        cast = {name: getattr(self, name).to(dtype) for name in ("protected", "anchor_factor", "key_factor",
                                                                   "directions", "offset_factor", "change_map")
                if getattr(self, name) is not None}
        return replace(self, **cast)

    @property
    def occupancy(self) -> float:
        """Share of the K/V input width the solve already holds: (protected rank + ``mapped_rank``) / d. At 1 every
        direction either keeps a protected state exactly or maps some removal's keys, so a new removal can only be
        mapped by moving the earlier ones (a least-squares compromise); ``check_capacity`` warns before that."""
        width = self.protected.shape[0]
        return (self.protected.shape[1] + self.mapped_rank) / width if width else 1.0

    def layer_factors(self, base: torch.Tensor, offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, d], B [out, r]) with D = B @ A the change of one weight whose current value is ``base + offset``
        (``offset`` None: the base itself), in the solver's dtype.

        Args:
            base: W0 [out, d], the base weight.
            offset: E [out, d], what earlier requests changed (None: nothing).

        Returns:
            (A [r, d], B [out, r]); a zero rank-1 pair when nothing may move.
        """
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

    def dense_change(self, base: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """D [out, d] for one weight, as one product with a d x d map shared by every layer.

        With K inverted exactly (``exact_inverse``) and the drift on span(P) corrected, the weight after the change
        is W0 (I + G), G = (anchor_factor - key_factor) F^T: the earlier requests' offset E cancels (its part on F
        through the pull, its part on span(P) through the drift correction), so D = W0 G - E. That is one
        [out, d] x [d, d] product per layer, what a plain UCE solve costs, instead of two products through the
        [d, f] factors. ``layer_factors`` gives the same change as factors, skipping a drift correction below 1e-6
        of the weight's largest entry; this form always applies it. Without ``exact_inverse`` (ridge 0) this is
        ``B @ A`` of ``layer_factors``.

        Args:
            base: W0 [out, d], the base weight.
            offset: E [out, d], what earlier requests changed (None: nothing).

        Returns:
            D [out, d] in the solver's dtype.
        """
        dtype = self.directions.dtype
        if not (self.exact_inverse and self.directions.shape[1]):
            a, b = self.layer_factors(base, offset)
            return b @ a
        if self.change_map is None:
            self.change_map = (self.anchor_factor - self.key_factor) @ self.directions.T
        change = base.to(dtype) @ self.change_map
        return change if offset is None else change - offset.to(dtype)

    def layer_change(self, base: torch.Tensor, offset: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """One weight's change in whichever stored form holds fewer numbers (``kv.adapters.smaller_form``): LoRA
        factors of rank r (r x (out + in)) or the dense delta (out x in).

        Args:
            base: W0 [out, d], the base weight.
            offset: E [out, d], what earlier requests changed (None: nothing).

        Returns:
            (A [r, d], B [out, r]) when the factors are smaller, else D [out, d]; in the solver's dtype.
        """
        out_features, in_features = base.shape
        rank = self.directions.shape[1]  # at least the factors' rank; the drift correction may add span(P)'s
        if smaller_form(rank, out_features, in_features) == "lora" or not self.exact_inverse:
            a, b = self.layer_factors(base, offset)
            if smaller_form(a.shape[0], out_features, in_features) == "lora":
                return a, b
            return b @ a
        return self.dense_change(base, offset)

    def layer_delta(self, base: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """D [out, d] for one weight.

        Args:
            base: W0 [out, d], the base weight.
            offset: E [out, d], what earlier requests changed (None: nothing).

        Returns:
            The dense change (``dense_change``).
        """
        return self.dense_change(base, offset)


_GRAM_CACHE = "_unlearn_closed_form_kept_gram"


def kept_gram(pipe: Any, chosen: Sequence[tuple[str, str]], states: PromptStates) -> torch.Tensor:
    """keep^T keep [d, d], float64, over the token states of every kept (concept, domain) (``concept_tokens``): the
    soft penalty's part of the solve, its costliest product (one row per token of every kept concept in every
    template). Cached on the pipeline with the concepts it sums, and updated for the next request by adding and
    subtracting only the concepts that changed (a stream's kept concepts lose the removed one at most), or summed
    again when more than half changed.

    Args:
        pipe: the pipeline whose text states are read (and that holds the cache).
        chosen: the kept (concept, domain) pairs.
        states: the token states to read (the cache is kept per ``states.key``).

    Returns:
        The Gram matrix [d, d], float64.
    """
    def gram(pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        rows = torch.cat([concept_tokens(pipe, c, d, states) for c, d in pairs])
        return rows.T @ rows

    # what concept_tokens reads: the concept, its domain's templates, the states
    wanted = {(c.lower(), d, tuple(TEMPLATES[d])): (c, d) for c, d in chosen}
    cached = pipe.__dict__.get(_GRAM_CACHE)
    total = None
    if cached is not None and cached[0] == states.key:
        added, dropped = wanted.keys() - cached[1].keys(), cached[1].keys() - wanted.keys()
        if len(added) + len(dropped) <= len(wanted) / 2:
            total = cached[2]
            if added:
                total = total + gram([wanted[k] for k in sorted(added)])
            if dropped:
                total = total - gram([cached[1][k] for k in sorted(dropped)])
    if total is None:
        total = gram(list(wanted.values()))
    pipe.__dict__[_GRAM_CACHE] = (states.key, wanted, total)
    return total


def edited_layers(solver: Solver, base_weights: Mapping[str, torch.Tensor],
                  start_offsets: Mapping[str, torch.Tensor] | None, layers: Sequence[str]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W0, W') per solved layer in float64: the base weight and the weight after ``solver``'s change, W' = W0 + E + D
    (start model E, the solve's change D).

    Args:
        solver: the built solver.
        base_weights: W0 per layer name.
        start_offsets: E per layer name (None: the request starts from the base).
        layers: the layers to compute, in order.

    Returns:
        (W0, W') per layer of ``layers``, float64 on the CPU.
    """
    out = []
    for layer in layers:
        w0 = base_weights[layer].detach().cpu().double()
        offset = start_offsets[layer].detach().cpu().double() if start_offsets else None
        out.append((w0, w0 + solver.layer_delta(w0, offset) + (0 if offset is None else offset)))
    return out


def recovery(edited: Sequence[tuple[torch.Tensor, torch.Tensor]], states: torch.Tensor, keys: torch.Tensor) -> float:
    """How much of the keys' base K/V outputs the states bring back on the edited layers: 1 - sum ||W' y - W0 x||^2 /
    sum ||W0 x||^2 over the layers and rows (y a row of ``states``, x the same row of ``keys``): 1 when they come back
    exactly, 0 when nothing of them does.

    Args:
        edited: (W0, W') per solved layer (``edited_layers``).
        states: [n, d] the K/V inputs fed to the edited weights (e.g. adversarial states).
        keys: [n, d] the keys whose base outputs they should bring back.

    Returns:
        The recovered share (at most 1; negative when the states land further away than zero output would).
    """
    energy = error = 0.0
    for w0, w in edited:
        wanted = keys.double() @ w0.T
        energy += float(wanted.square().sum())
        error += float((states.double() @ w.T - wanted).square().sum())
    return 1 - error / energy


def adversarial_map(edited: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """RECE's closed-form adversarial embedding on the edited weights, as a linear map of the key it attacks.

    For a key x (a state of a removed concept's tokens), e = argmin_e sum_l ||W'_l e - W0_l x||^2 + lambda ||e - x||^2
    over the solved layers: the K/V input near x that brings x's base outputs back on the edited model, where a
    learnt embedding started from the concept heads. Every layer reads the same input, so e = M x with one d x d
    matrix M = (sum W'^T W' + lambda I)^-1 (sum W'^T W0 + lambda I) for every key, in float64; lambda is
    ``ADVERSARIAL_RIDGE`` times the mean eigenvalue of sum W'^T W' (the pull towards x: with none, e may lie far
    from any state the text encoder gives).

    Args:
        edited: (W0, W') per solved layer (``edited_layers``).

    Returns:
        M [d, d], float64: the adversarial states of keys [n, d] are ``keys @ M.T``.
    """
    d = edited[0][0].shape[1]
    gram = sum(w.T @ w for _, w in edited)
    cross = sum(w.T @ w0 for w0, w in edited)
    lam = ADVERSARIAL_RIDGE * float(torch.trace(gram)) / d
    eye = torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(gram + lam * eye, cross + lam * eye)


def cap_kept_span(protected: torch.Tensor, fraction: float | None) -> tuple[torch.Tensor, int | None]:
    """``protected`` [d, m], or its strongest ``fraction * d`` directions (scaled by their singular values) when it
    spans more; with the rank it had when capped (None when left as it is).

    Args:
        protected: P [d, m].
        fraction: the largest share of the width d to hold exactly, in (0, 1); None: no cap.

    Returns:
        (the columns to protect, the uncapped rank or None).
    """
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


class CapacityWarning(UserWarning):
    """The closed form's solve holds (nearly) every direction of the K/V input: a new removal can only be mapped by
    moving the earlier ones (``Solver.occupancy`` reached ``CAPACITY_FRACTION``)."""


def check_capacity(solver: Solver, concept: str, fraction: float = CAPACITY_FRACTION) -> bool:
    """Warn (``CapacityWarning``) when ``solver.occupancy`` reaches ``fraction`` of the K/V input width. ``solve``
    asks from a stream's second request on, once earlier removals share the space with the new one.

    The mapped rank saturates just below the free width (the last directions' key energy rarely clears the ridge),
    so the default fraction is a little under 1: past it each request adds only a few directions, and every new
    removal is fitted against the earlier ones (what the measured streams do there: docs/benchmarks/closed-form.md,
    "Capacity").

    Args:
        solver: the built solver of the request.
        concept: the concept being removed (named in the warning).
        fraction: the share of the width at which to warn, in (0, 1].

    Returns:
        Whether it warned.
    """
    check_number(fraction, "fraction", minimum=0, maximum=1, exclusive_minimum=True)
    occupied = solver.occupancy
    if occupied < fraction:
        return False
    width, kept = solver.protected.shape
    warnings.warn(
        f"closed_form: removing {concept!r} fills the K/V layers' {width}-wide text space ({kept} directions keep "
        f"protected states exactly, {solver.mapped_rank} map this and the earlier removals; {occupied:.0%} of the "
        f"width): removals now share directions and each new one moves the earlier ones' mapping. Free room by "
        "keeping fewer concepts (vocabulary=, keep=) or holding fewer exactly (a lower max_kept_fraction=), by "
        "rolling back removals no longer needed (pipe.rollback), or with keep_earlier=False (later requests may then "
        "undo earlier removals); fold() and a lower keep_weight do not free it (the ledger still keeps every removal "
        "mapped, and the kept states stay held)",
        CapacityWarning, stacklevel=3)
    return True


def _inverse(system: torch.Tensor, definite: bool) -> torch.Tensor:
    """K^-1 of the symmetric system: by Cholesky when it is positive definite (a ridge > 0; a third of the work of
    an eigendecomposition), else (or if Cholesky fails) the pseudo-inverse (ridge 0 with few keys leaves K
    singular)."""
    if definite:
        factor, info = torch.linalg.cholesky_ex(system)
        if not int(info):
            return torch.cholesky_inverse(factor)
    return torch.linalg.pinv(system, hermitian=True)


def compact_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (A, B) with the same product: kept as they are below rank min(out, in), otherwise the product with an
    identity factor (rank min(out, in), like a dense delta), so that stacked requests stay cheap.

    Args:
        a: A [r, in].
        b: B [out, r].

    Returns:
        (A, B) in float32, contiguous, with B @ A equal to the input product.
    """
    if a.shape[0] >= min(b.shape[0], a.shape[1]):
        a, b = identity_factors(b @ a)
    return a.float().contiguous(), b.float().contiguous()


def solve(pipe: Any, *, concept: str, domain: str, prompts: Sequence[str], config: ClosedFormConfig,
          base_weights: Mapping[str, torch.Tensor], start_offsets: Mapping[str, torch.Tensor] | None,
          earlier: Sequence[Any], progress: bool = False, also: Sequence[tuple[str, Sequence[str]]] = ()
          ) -> tuple[RequestAdapter, dict[str, Any]]:
    """One request's artifact and a report (protected concepts, share of the target in the protected span).

    Args:
        pipe: the pipeline being edited.
        concept: the concept to remove.
        domain: its domain.
        prompts: the request's prompts naming the concept.
        config: the closed-form settings.
        base_weights: W0 per K/V layer name.
        start_offsets: E per layer, what earlier requests changed (None: the request starts from the base).
        earlier: the ledger records of the requests before this one (their removals stay mapped).
        progress: show progress bars.
        also: (concept, its prompts) of the request's other concepts, mapped jointly with ``concept`` in one solve
            (same weight and settings; left out of what is kept).

    Returns:
        (the request's ``RequestAdapter``, a JSON-ready report for its ledger record).

    Raises:
        ValueError: the anchor is the concept, or the concept cannot be found in the prompts' tokens.
    """
    together = [(concept, prompts), *also]
    if any(same_concept(config.anchor, c) for c, _ in together):
        raise ValueError(f"anchor {config.anchor!r} is the concept being removed")
    earlier_list = earlier_requests(earlier)
    removed = [e.concept for e in earlier_list]
    layers = list(base_weights)
    family = family_of(pipe)
    solved_layers = family.prompt_only_layers(layers)  # every UNet layer; the first joint block's
    states = PromptStates.for_pipeline(pipe, layers, steps=config.sampling_steps, guidance_scale=config.guidance_scale,
                                       resolution=config.resolution)
    per_t = family.per_block_text_states  # joint blocks modulate the text by t: kept states per solve timestep
    protected, chosen = protected_columns(pipe, concept, domain, config, removed + [c for c, _ in also], states,
                                          progress=progress)
    protected, uncapped_rank = cap_kept_span(protected, config.max_kept_fraction)
    names = [c for c, _ in chosen]
    keep_gram = kept_gram(pipe, chosen, states) if chosen and config.keep_weight > 0 else None
    mappings = [mapping_keys(pipe, c, config.anchor, p, config.map_every_token, config.negative_guidance, states)
                for c, p in together]
    # the earlier removals this solve keeps mapped: not one of this request's concepts, and named in their prompts
    kept_mapped = [e for e in earlier_list if e.prompts and not any(same_concept(e.concept, c) for c, _ in together)] \
        if config.keep_earlier else []
    soft_weight = config.keep_weight
    if config.siblings:
        # the concept's words each beside random ones, for every concept the solve maps (this request's and the
        # earlier removals kept mapped): kept softly, so the edit moves each concept's own combination of words
        sources = list(together) + [(e.concept, e.prompts) for e in kept_mapped]
        rows = torch.cat([sibling_tokens(pipe, c, p, config.siblings, states) for c, p in sources])
        sibling_gram = (config.sibling_weight / config.siblings) * (rows.T @ rows)  # the draws share the weight
        keep_gram = sibling_gram if keep_gram is None else config.keep_weight * keep_gram + sibling_gram
        soft_weight = 1.0  # both penalties are weighted inside the Gram matrix
    skipped = []
    for item in kept_mapped:
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
    earlier_mapped = len(mappings) - len(together)
    weights = [config.concept_weight] * len(together) + [config.earlier_weight] * earlier_mapped
    solver = Solver.build(protected, mappings, config.ridge, weights, keep_weight=soft_weight,
                          keep_gram=keep_gram)
    rounds = []
    if config.adversarial_rounds:
        # RECE: the states that bring each mapped concept (this one and the earlier removals kept mapped) back on the
        # edited weights join what maps onto its anchor, with its targets and weight; the solve runs again under the
        # same protection
        attacked = list(zip(mappings, weights))
        concept_keys = mappings[0][0]
        for _ in range(config.adversarial_rounds):
            edited = edited_layers(solver, base_weights, start_offsets, solved_layers)
            found = adversarial_map(edited)
            for (keys, targets), weight in attacked:
                mappings.append((keys.double() @ found.T, targets))
                weights.append(weight)
            solver = Solver.build(protected, mappings, config.ridge, weights, keep_weight=soft_weight,
                                  keep_gram=keep_gram)
            after = edited_layers(solver, base_weights, start_offsets, solved_layers)
            adversarial = concept_keys.double() @ found.T
            rounds.append({"recovery": round(recovery(edited, adversarial, concept_keys), 6),
                           "recovery_after": round(recovery(after, adversarial, concept_keys), 6),
                           "recovery_plain": round(recovery(edited, concept_keys, concept_keys), 6)})
    width, kept_rank = solver.protected.shape
    if not solver.directions.shape[1]:
        why = (f"what it keeps fills the K/V layers' {width}-wide input space ({protected.shape[1]} kept states)"
               if kept_rank >= width else f"the states of {concept!r} lie inside the span of what it keeps")
        warnings.warn(f"closed_form changes nothing while removing {concept!r}: {why}. Keep fewer concepts "
                      f"(vocabulary=, keep=){' or solve on fewer timesteps (sampling_steps=)' if per_t else ''}, "
                      f"or hold only part of them exactly (max_kept_fraction=0.75, the recommended recipe's)",
                      stacklevel=3)
    elif earlier_mapped:  # removals share the space only once there are earlier ones kept mapped
        check_capacity(solver, concept)
    # Applied to each float32 weight in float32: the change is stored in float32 anyway, and it halves the cost.
    applied = solver.to(torch.float32)
    for layer in tqdm(layers, desc=f"solving {concept!r}", disable=not progress, leave=False):
        base = base_weights[layer].detach().cpu()
        if layer in solved_layers:
            offset = start_offsets[layer].detach().cpu() if start_offsets else None
            change = applied.layer_change(base, offset)
        else:  # reads image-dependent states (later joint blocks): left as it is, stored as a zero change
            change = torch.zeros(1, base.shape[1]), torch.zeros(base.shape[0], 1)
        if isinstance(change, tuple):  # per layer, whichever form is smaller: factors or the dense delta
            tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"] = (t.float().contiguous() for t in change)
        else:
            tensors[f"{layer}.delta"] = change.float().contiguous()
        scales[layer] = 1.0
    q = solver.protected
    target = concept_states(pipe, concept, domain, states)[1].T  # [d, S * T]
    in_span = float((q.T @ target).square().sum() / target.square().sum()) if q.shape[1] else 0.0
    report = {"protected": names, "protected_columns": int(protected.shape[1]), "protected_rank": int(q.shape[1]),
              "target_in_span": round(in_span, 6), "earlier_mapped": earlier_mapped,
              "solve_rank": int(solver.directions.shape[1]), "mapped_rank": solver.mapped_rank,
              "occupancy": round(solver.occupancy, 6), "ridge": config.ridge,
              "solved_layers": len(solved_layers)}
    if uncapped_rank is not None:
        report["protected_rank_uncapped"] = uncapped_rank
    if config.siblings:
        report["sibling_states"] = int(rows.shape[0])
    if rounds:  # what the best state recovers on the final weights, and what the concept's own states do
        edited, keys = edited_layers(solver, base_weights, start_offsets, solved_layers), mappings[0][0]
        adversarial = keys.double() @ adversarial_map(edited).T
        report["adversarial"] = {"rounds": rounds, "recovery": round(recovery(edited, adversarial, keys), 6),
                                 "recovery_plain": round(recovery(edited, keys, keys), 6)}
    return RequestAdapter("lora", tensors, scales), report
