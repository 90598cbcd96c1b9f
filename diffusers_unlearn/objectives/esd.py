"""ESD (Gandikota et al., 2023), negative-guidance variant: steer the concept's prediction away from it.

Target for x_t on the frozen model's own trajectory for the concept prompt:
f(x_t, empty) - eta * (f(x_t, concept) - f(x_t, empty)), all from the frozen model, where f is the denoiser's own
output: noise for SD/SDXL, the flow-matching velocity noise - x0 for SD3 and Flux (trajectories then come from the
pipeline's flow-matching scheduler). At fixed x_t and t the velocity is an affine function of the noise
prediction and the target's weights (1 + eta, -eta) sum to one, so it is the same target in either
parametrisation. Guidance-distilled Flux has no unconditional branch at sampling time: "empty" is the empty
prompt, and every prediction (frozen and trained) is taken at the same distilled guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._validation import check_number
from ..families.conditioning import Conditioning
from .base import (TrainedObjectiveConfig, TrajectoryObjective, check_concepts, cond_rows, register_objective,
                   request_prompts_with)

REFERENCES = ("empty", "context")


@dataclass
class ESDConfig(TrainedObjectiveConfig):
    """Settings of ESD (``method="esd"``).

    Args:
        negative_guidance: eta, how far past the reference prediction the target goes (ESD default 1.0).
        reference: what the concept's prediction is steered from: "empty" (ESD's unconditional prediction, default)
            or "context" (the request's prompt without the concept, so that the rest of the prompt is kept).
        concepts: with ``reference="context"``, for a request over several concepts, the concepts its prompts
            contain (each prompt's own is taken out). None (default): the request's one concept.
        sampling_steps: as in ``ObjectiveConfig``.
        guidance_scale: as in ``ObjectiveConfig``.
        num_trajectories: as in ``ObjectiveConfig``.
        resolution: as in ``ObjectiveConfig``.
        keep: as in ``TrainedObjectiveConfig``.
        keep_weight: as in ``TrainedObjectiveConfig``.
    """

    method: ClassVar[str] = "esd"
    negative_guidance: float = 1.0
    reference: str = "empty"
    concepts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.negative_guidance, "negative_guidance", minimum=0)
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {list(REFERENCES)}, got {self.reference!r}")
        self.concepts = check_concepts(self.concepts)


class ESDObjective(TrajectoryObjective):
    """Erased Stable Diffusion: train the concept's prediction toward the reference prediction pushed away from
    the concept (negative guidance), on the frozen model's own trajectories of the concept.

    Args:
        config: the ESD settings.
        context: the request's model, prompts and generator, as the trainer gives them.
    """

    def prepare(self) -> None:
        """Encode the reference prompts (empty or the context without the concept) and sample the trajectories.

        Raises:
            ValueError: ``reference="context"`` and a prompt does not contain the concept.
        """
        # the reference prompts first: a prompt without the concept fails before any trajectory is sampled
        references = (request_prompts_with(self.context, "", self.config.concepts)
                      if self.config.reference == "context" else None)
        super().prepare()
        self.reference_cond = (self.uncond if references is None
                               else self.context.conditioner.encode(references).select(self.rows_prompt))

    def frozen_target(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The frozen reference prediction minus ``negative_guidance`` times the concept's guidance direction.

        Args:
            latents: the trajectory latents x_t, one per row.
            timesteps: the scheduler timestep of each latent.
            rows: the trajectory index of each latent.

        Returns:
            The target prediction, shaped like ``latents``.
        """
        ctx = self.context
        both = Conditioning.cat([cond_rows(self.reference_cond, rows), cond_rows(self.sampling_cond, rows)])
        noise = ctx.conditioner.predict(
            ctx.denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both
        ).float()
        reference, concept = noise.chunk(2)
        return reference - self.config.negative_guidance * (concept - reference)


register_objective(ESDConfig, ESDObjective)
