"""Concept Ablation (Kumari et al., 2023), model-based: make the concept predict what its anchor predicts.

x_t comes from the frozen model's trajectory for the anchor prompt; the adapted model's prediction for the target
prompt on x_t is trained toward the frozen prediction for the anchor prompt (stop-gradient).

One request may remove several concepts at once (``concepts=``, e.g. a simultaneous retraining on every concept
removed so far): each prompt then has its own concept swapped for the anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..prompts import check_concept, same_concept
from .base import (TrainedObjectiveConfig, TrajectoryObjective, check_concepts, cond_rows, register_objective,
                   request_prompts_with)


@dataclass
class CAConfig(TrainedObjectiveConfig):
    """Settings of Concept Ablation (``method="ca"``).

    Args:
        anchor: the concept to map onto, e.g. "a painting" for a style or "a horse" for "a cat". Anchor prompts are
            the request's templates filled with it, paired one to one with the target prompts.
        concepts: for a request over several concepts, the concepts its prompts contain; each prompt's own concept
            is swapped for the anchor (longest match first). None (default): the request's one concept.
        sampling_steps: as in ``ObjectiveConfig``.
        guidance_scale: as in ``ObjectiveConfig``.
        num_trajectories: as in ``ObjectiveConfig``.
        resolution: as in ``ObjectiveConfig``.
        keep: as in ``TrainedObjectiveConfig``.
        keep_weight: as in ``TrainedObjectiveConfig``.
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
        self.concepts = check_concepts(self.concepts, exclude=self.anchor)


class CAObjective(TrajectoryObjective):
    """Concept Ablation: train the concept's prediction toward the frozen model's prediction for the anchor, on
    trajectories sampled from the anchor prompts, so the concept renders as its anchor.

    Args:
        config: the CA settings (``anchor`` required).
        context: the request's model, prompts and generator, as the trainer gives them.
    """

    def prepare(self) -> None:
        """Build the anchor prompts (paired one to one with the request's prompts) and sample their trajectories.

        Raises:
            ValueError: the anchor is the concept being removed, or a prompt does not contain the concept.
        """
        if self.config.concepts is None and any(same_concept(self.config.anchor, c) for c in self.context.removed):
            raise ValueError(f"anchor {self.config.anchor!r} is the concept being removed")
        # Anchor prompts pair one to one with the target prompts: same template, anchor in the concept's slot.
        self.anchor_prompts = request_prompts_with(self.context, self.config.anchor, self.config.concepts)
        super().prepare()

    def sampling_prompts(self) -> list[str]:
        """The anchor prompts: trajectories are sampled from the anchor, not from the concept.

        Returns:
            One anchor prompt per request prompt, in the same order.
        """
        return self.anchor_prompts

    def frozen_target(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The frozen model's prediction for the anchor prompt of each row.

        Args:
            latents: the trajectory latents x_t, one per row.
            timesteps: the scheduler timestep of each latent.
            rows: the trajectory index of each latent.

        Returns:
            The target prediction, shaped like ``latents``.
        """
        ctx = self.context
        return ctx.conditioner.predict(ctx.denoiser, latents, timesteps, cond_rows(self.sampling_cond, rows))


register_objective(CAConfig, CAObjective)
