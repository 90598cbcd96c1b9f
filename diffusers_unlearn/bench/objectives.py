"""Concept Ablation over several concepts in one request, for the simultaneous protocol with ``--method ca``.

The engine's ``ca`` pairs each target prompt with an anchor prompt by swapping the request's one concept for the
anchor. Simultaneous unlearning trains one request on the prompts of every concept removed so far, so each prompt
must swap its own concept: ``ca_multi`` does that and is otherwise ``ca``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..objectives import register_objective
from ..objectives.ca import CAConfig, CAObjective, _swap
from ..prompts import check_concept


@dataclass
class CAMultiConfig(CAConfig):
    """Args:
    concepts: the concepts the request's prompts contain; each prompt's own concept is swapped for the anchor.
    """

    method: ClassVar[str] = "ca_multi"
    concepts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.concepts, str) or not self.concepts:
            raise ValueError(f"ca_multi needs the list of concepts its prompts contain, got {self.concepts!r}")
        self.concepts = tuple(check_concept(c) for c in self.concepts)


class CAMultiObjective(CAObjective):
    def prepare(self) -> None:
        anchor = self.config.anchor
        # longest first: a concept that contains another ("neon dots" / "dots") must win
        concepts = sorted(self.config.concepts, key=len, reverse=True)
        if any(c.lower() == anchor.lower() for c in concepts):
            raise ValueError(f"anchor {anchor!r} is one of the concepts being removed")
        anchor_prompts = []
        for prompt in self.context.prompts:
            concept = next((c for c in concepts if c.lower() in prompt.lower()), None)
            if concept is None:
                raise ValueError(f"prompt {prompt!r} contains none of the concepts {list(self.config.concepts)}")
            anchor_prompts.append(_swap(prompt, concept, anchor))
        self.anchor_prompts = anchor_prompts
        # the trajectory machinery of every objective (CAObjective.prepare would recompute the anchor prompts)
        super(CAObjective, self).prepare()


register_objective(CAMultiConfig, CAMultiObjective)
