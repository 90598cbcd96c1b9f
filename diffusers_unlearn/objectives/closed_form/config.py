"""``ClosedFormConfig``: the settings of the closed-form erasure (``method="closed_form"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..._validation import check_count, check_number
from ...prompts import check_concept
from ..base import ObjectiveConfig

PROTECTIONS = ("span", "soft")
MAX_ADVERSARIAL_ROUNDS = 100
MAX_SIBLINGS = 256  # draws per word: more only slow the request (each draw is one more prompt to encode per prompt)


@dataclass
class ClosedFormConfig(ObjectiveConfig):
    """Settings of the closed-form erasure: what the concept maps onto, what is kept, and how the solve weighs them.

    Args:
        anchor: what the concept's tokens should produce instead: "" (default: the empty slot, "an image in style"),
            or a domain anchor such as "painting". Anchor prompts are the request's prompts with the concept swapped.
        keep: concepts whose K/V outputs must stay at the base model's (embedded in the request's domain). Formerly
            ``preserve``.
        vocabulary: auxiliary concepts kept too, ``{domain: [concepts]}`` or a list (request's domain); default the
            built-in styles and objects. The target and every concept removed earlier are left out.
        protect_unconditional: keep every token of the empty prompt at its base outputs (it enters every image
            through classifier-free guidance).
        keep_earlier: keep every earlier removal of the ledger mapped to its anchor, so that a later request cannot
            undo it. Formerly ``include_earlier``.
        concept_weight: weight of the new concept's token pairs in the least squares (against the kept concepts'
            ``keep_weight``).
        earlier_weight: weight of each earlier removal's token pairs against the new concept's in the least squares:
            where both compete for the same free directions, the earlier removals win.
        keep_weight: weight of each token of the kept concepts' prompts (every token from the concept on, in every
            template of its domain) in a soft penalty on its output change: span(P) holds each kept concept's
            average vector exactly, this keeps its individual tokens close too (UCE's preservation term). Formerly
            ``preserve_weight``.
        protection: "span" (exact on the kept concepts' average embeddings, soft on their tokens) or "soft" (only the
            soft penalty on the kept concepts' tokens, UCE's form; the empty prompt stays exact either way).
        map_every_token: map each of the concept's tokens onto the anchor (default); False: its last token and the
            ones after it only, as UCE does (on a 2-word style the first word, e.g. the palette, then survives).
        negative_guidance: g >= 0; each mapped token c aims at W0 (a + g (a - c)) instead of W0 a: past the anchor,
            away from the concept, as ESD's negative guidance does for noise predictions (an anchor whose own images
            resemble the concept, as an empty style slot can, then still erases).
        ridge: Tikhonov weight of the mapping solve, relative to the mean eigenvalue of its key covariance: bounds
            the edit when the concept's part outside the protected span is tiny (0: exact least squares).
        max_kept_fraction: None (default): every kept state is held exactly, even when together they span the whole
            K/V input (then the request changes nothing, and says so). A fraction f in (0, 1): the exactly kept span
            is capped at f x the input width, its strongest directions (the rest are kept by the soft penalty only),
            so a model with a narrow text space keeps room to erase. The recommended recipe uses
            ``RECOMMENDED_KEPT_FRACTION``.
        adversarial_rounds: k >= 0 rounds of RECE-style adversarial erasure (default 0: none). Each round finds, for
            every state of the concept's tokens (and of each earlier removal kept mapped), the K/V input that best
            brings its base outputs back on the edited weights (closed form, ``solver.adversarial_map``: what a
            learnt embedding aims at), adds it to what maps onto the anchor and solves again under the same
            protection. The report records each round's recovery and the final one. A later request solves the
            earlier removals again with its own rounds: give every request of a stream the same number.
        siblings: n >= 0 random draws per word (default 0: none). Each word of the concept (and of each earlier removal
            kept mapped) is replaced, in the request's prompts, by n random token embeddings drawn from the text
            encoder's own token table statistics (``siblings.sibling_tokens``), and the states after it are kept by a
            soft penalty: the solve then moves the concept's own combination of words rather than what each word
            brings to every other phrase. No real word is drawn, so no concept is kept by name; the concepts nobody
            named that share a word with the removed one keep most of their images (docs/benchmarks/retention.md).
        sibling_weight: the soft penalty's total weight on each (prompt, word)'s draws (each draw weighs
            ``sibling_weight / siblings``), against a mapped token's ``concept_weight``.
        sampling_steps: on SD3 and Flux the solve reads the text states at the timesteps of this many sampler steps
            (``resolution`` shifts Flux's schedule); with ``guidance_scale`` and ``num_trajectories`` it also sets the
            erasure check's trajectories (see ``ObjectiveConfig``).
        guidance_scale: as in ``ObjectiveConfig`` (the erasure check's trajectories).
        num_trajectories: as in ``ObjectiveConfig`` (the erasure check's trajectories).
        resolution: as in ``ObjectiveConfig``; on Flux it also shifts the timesteps the solve reads.

    Raises:
        ValueError: a value out of range (each error names the field and what it accepts).
        TypeError: a value of the wrong kind.
    """

    method: ClassVar[str] = "closed_form"
    renamed_options: ClassVar[Mapping[str, str]] = {"preserve": "keep", "preserve_weight": "keep_weight",
                                                    "include_earlier": "keep_earlier"}
    anchor: str = ""
    keep: Sequence[str] = field(default_factory=list)
    vocabulary: Mapping[str, Sequence[str]] | Sequence[str] | None = None
    protect_unconditional: bool = True
    keep_earlier: bool = True
    # concept_weight 10 (the new concept weighs as much as each earlier removal), keep_weight 0.5 and
    # negative_guidance 1: the MiniCanvas bench's best over 12 requests (docs/benchmarks/closed-form.md): every
    # removal erased, in held-out wordings too, with the kept styles and the objects at base. Relative to a mapped
    # token a kept one weighs 0.05; UCE's plain form is keep_weight 0.1, guidance 0.
    concept_weight: float = 10.0
    earlier_weight: float = 10.0
    keep_weight: float = 0.5
    protection: str = "span"
    map_every_token: bool = True
    negative_guidance: float = 1.0
    ridge: float = 1e-4
    max_kept_fraction: float | None = None
    adversarial_rounds: int = 0
    siblings: int = 0
    sibling_weight: float = 1.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_kept_fraction is not None:
            check_number(self.max_kept_fraction, "max_kept_fraction", minimum=0, maximum=1, exclusive_minimum=True,
                         exclusive_maximum=True)
        if not isinstance(self.anchor, str):
            raise TypeError(f"anchor must be a string ('' for the empty slot), got {self.anchor!r}")
        self.anchor = " ".join(self.anchor.split())
        if isinstance(self.keep, str):
            self.keep = [self.keep]
        self.keep = [check_concept(c, "keep concept") for c in self.keep]
        if self.vocabulary is not None:
            if isinstance(self.vocabulary, Mapping):
                self.vocabulary = {str(d): [check_concept(c, "vocabulary concept") for c in cs]
                                   for d, cs in self.vocabulary.items()}
            elif isinstance(self.vocabulary, Sequence) and not isinstance(self.vocabulary, str):
                self.vocabulary = [check_concept(c, "vocabulary concept") for c in self.vocabulary]
            else:
                raise TypeError(f"vocabulary must be a dict of domain -> concepts or a list, got {self.vocabulary!r}")
        for name in ("protect_unconditional", "keep_earlier", "map_every_token"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("concept_weight", "earlier_weight"):
            check_number(getattr(self, name), name, minimum=0, exclusive_minimum=True)
        check_count(self.siblings, "siblings", minimum=0, maximum=MAX_SIBLINGS)
        for name in ("keep_weight", "negative_guidance", "ridge", "sibling_weight"):
            check_number(getattr(self, name), name, minimum=0)
        check_count(self.adversarial_rounds, "adversarial_rounds", minimum=0, maximum=MAX_ADVERSARIAL_ROUNDS)
        if self.protection not in PROTECTIONS:
            raise ValueError(f"protection must be one of {list(PROTECTIONS)}, got {self.protection!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as the ledger records them; ``adversarial_rounds`` only when it is not 0, ``siblings`` and
        ``sibling_weight`` only when ``siblings`` is not 0.

        Returns:
            A JSON-ready dict, the same as before these options existed for requests without them.
        """
        data = super().to_dict()
        if not self.adversarial_rounds:  # requests without adversarial rounds keep the record they always had
            del data["adversarial_rounds"]
        if not self.siblings:
            del data["siblings"], data["sibling_weight"]
        return data

    def check_regularizers(self, regularizers: Sequence[Any]) -> None:
        """Refuse every regularizer: the solve trains nothing for one to act on (its protection is built in).

        Args:
            regularizers: the request's regularizer objects.

        Raises:
            ValueError: any regularizer is given.
        """
        if regularizers:
            names = [getattr(r, "name", type(r).__name__) for r in regularizers]
            raise ValueError(
                f"method 'closed_form' takes no regularizers (got {names}): it trains nothing for a drift penalty, "
                "mask or gradient projection to act on. Its protection is built in: pass keep=[...] and "
                "vocabulary=... for the concepts to keep; earlier removals are kept from the ledger"
            )
