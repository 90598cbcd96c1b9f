"""Concept Ablation (Kumari et al., 2023), model-based: make the concept predict what its anchor predicts.

x_t comes from the frozen model's trajectory for the anchor prompt; the adapted model's prediction for the target
prompt on x_t is trained toward the frozen prediction for the anchor prompt (stop-gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..prompts import check_concept, same_concept
from .base import ObjectiveConfig, TrajectoryObjective, cond_rows, register_objective


@dataclass
class CAConfig(ObjectiveConfig):
    """Args:
    anchor: the concept to map onto, e.g. "a painting" for a style or "a horse" for "a cat". Anchor prompts are
        the request's templates filled with it, paired one to one with the target prompts.
    """

    method: ClassVar[str] = "ca"
    anchor: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor is None:
            raise ValueError(
                "method 'ca' needs an anchor concept, e.g. anchor='a painting' for a style or anchor='a horse' "
                "for 'a cat'"
            )
        self.anchor = check_concept(self.anchor, "anchor")


class CAObjective(TrajectoryObjective):
    def prepare(self) -> None:
        if same_concept(self.config.anchor, self.context.concept):
            raise ValueError(f"anchor {self.config.anchor!r} is the concept being removed")
        concept, anchor = self.context.concept, self.config.anchor
        # Anchor prompts pair one to one with the target prompts: same template, anchor in the concept's slot.
        if self.context.templates is not None:
            self.anchor_prompts = [template.format(anchor) for template in self.context.templates]
        else:
            missing = [p for p in self.context.prompts if concept.lower() not in p.lower()]
            if missing:
                raise ValueError(f"method 'ca' pairs prompts by swapping {concept!r} for the anchor; not in {missing}")
            self.anchor_prompts = [_swap(p, concept, anchor) for p in self.context.prompts]
        super().prepare()

    def sampling_prompts(self) -> list[str]:
        return self.anchor_prompts

    def frozen_target(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        return ctx.conditioner.predict(ctx.unet, latents, timesteps, cond_rows(self.sampling_cond, rows))


def _swap(prompt: str, concept: str, anchor: str) -> str:
    start = prompt.lower().index(concept.lower())
    return prompt[:start] + anchor + prompt[start + len(concept) :]


register_objective(CAConfig, CAObjective)
