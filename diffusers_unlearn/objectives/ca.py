"""Concept Ablation (Kumari et al., 2023), model-based: make the concept predict what its anchor predicts.

x_t comes from the frozen model's trajectory for the anchor prompt; the adapted model's prediction for the target
prompt on x_t is trained toward the frozen prediction for the anchor prompt (stop-gradient).

One request may remove several concepts at once (``concepts=``, e.g. a simultaneous retraining on every concept
removed so far): each prompt then has its own concept swapped for the anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..prompts import check_concept, same_concept
from .base import ObjectiveConfig, TrajectoryObjective, cond_rows, register_objective


@dataclass
class CAConfig(ObjectiveConfig):
    """Args:
    anchor: the concept to map onto, e.g. "a painting" for a style or "a horse" for "a cat". Anchor prompts are
        the request's templates filled with it, paired one to one with the target prompts.
    concepts: for a request over several concepts, the concepts its prompts contain; each prompt's own concept
        is swapped for the anchor (longest match first). None (default): the request's one concept.
    """

    method: ClassVar[str] = "ca"
    anchor: str | None = None
    concepts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor is None:
            raise ValueError(
                "method 'ca' needs an anchor concept, e.g. anchor='a painting' for a style or anchor='a horse' "
                "for 'a cat'"
            )
        self.anchor = check_concept(self.anchor, "anchor")
        if self.concepts is not None:
            if isinstance(self.concepts, str) or not self.concepts:
                raise ValueError(
                    f"concepts must be a non-empty list of the concepts the prompts contain, got {self.concepts!r}"
                )
            self.concepts = tuple(check_concept(c, "each of concepts") for c in self.concepts)
            if any(same_concept(c, self.anchor) for c in self.concepts):
                raise ValueError(f"anchor {self.anchor!r} is one of the concepts being removed {list(self.concepts)}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["concepts"] is None:  # one-concept requests keep the record they always had
            del data["concepts"]
        else:
            data["concepts"] = list(data["concepts"])
        return data


class CAObjective(TrajectoryObjective):
    def prepare(self) -> None:
        if self.config.concepts is not None:
            self.anchor_prompts = self._swap_each_prompts_concept()
        else:
            self.anchor_prompts = self._swap_request_concept()
        super().prepare()

    def _swap_request_concept(self) -> list[str]:
        concept, anchor = self.context.concept, self.config.anchor
        if same_concept(anchor, concept):
            raise ValueError(f"anchor {anchor!r} is the concept being removed")
        # Anchor prompts pair one to one with the target prompts: same template, anchor in the concept's slot.
        if self.context.templates is not None:
            return [template.format(anchor) for template in self.context.templates]
        missing = [p for p in self.context.prompts if concept.lower() not in p.lower()]
        if missing:
            raise ValueError(f"method 'ca' pairs prompts by swapping {concept!r} for the anchor; not in {missing}")
        return [_swap(p, concept, anchor) for p in self.context.prompts]

    def _swap_each_prompts_concept(self) -> list[str]:
        # longest first: a concept that contains another ("neon dots" / "dots") must win
        concepts = sorted(self.config.concepts, key=len, reverse=True)
        anchor_prompts = []
        for prompt in self.context.prompts:
            concept = next((c for c in concepts if c.lower() in prompt.lower()), None)
            if concept is None:
                raise ValueError(f"prompt {prompt!r} contains none of the concepts {list(self.config.concepts)}")
            anchor_prompts.append(_swap(prompt, concept, self.config.anchor))
        return anchor_prompts

    def sampling_prompts(self) -> list[str]:
        return self.anchor_prompts

    def frozen_target(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        return ctx.conditioner.predict(ctx.unet, latents, timesteps, cond_rows(self.sampling_cond, rows))


def _swap(prompt: str, concept: str, anchor: str) -> str:
    start = prompt.lower().index(concept.lower())
    return prompt[:start] + anchor + prompt[start + len(concept) :]


register_objective(CAConfig, CAObjective)
