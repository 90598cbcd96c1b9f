"""``paraphrase``: the concept in wordings the removal request never trained on.

For a concept of the attack's world (``EvalWorld``) the held-out wordings are the world's ``heldout_templates``
(prompts the model was trained to understand but no request uses), across the world's other axis. Elsewhere, or
for a world without them, ``templates=`` or a generic list per domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..world import EvalWorld
from .base import Attack, AttackConfig, AttackOutcome, check_templates

# Wordings no request template of the domain uses (du.prompts.TEMPLATES).
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "style": ("{} artwork", "a drawing in the manner of {}", "an illustration, {} style", "a landscape styled as {}"),
    "object": ("a close-up of a {}", "a drawing of a {}", "a {} on a street", "a {} at night"),
    "concept": ("a depiction of {}", "{}, detailed", "an artwork showing {}", "a scene with {}"),
}


def default_heldout_templates(world: EvalWorld | None, axis: str | None, domain: str) -> tuple[str, ...]:
    """The world's held-out wordings for one of its concepts (``axis`` not None), else the domain's generic ones."""
    if world is not None and axis is not None and world.heldout_templates:
        return tuple(world.heldout_templates)
    return HELDOUT_TEMPLATES.get(domain.rsplit("-", 1)[-1], HELDOUT_TEMPLATES["concept"])


@dataclass
class ParaphraseAttackConfig(AttackConfig):
    """Settings of the ``paraphrase`` attack.

    Args:
        templates: the held-out wordings, each with one ``{}`` slot (or ``{style}`` and ``{object}`` for a concept
            of the attack's world).
        seeds: as in ``AttackConfig``.
        num_inference_steps: as in ``AttackConfig``.
        guidance_scale: as in ``AttackConfig``.
        batch_size: as in ``AttackConfig``.
        plain_templates: as in ``AttackConfig``.
        progress: as in ``AttackConfig``.
    """

    kind: ClassVar[str] = "paraphrase"
    templates: Sequence[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.templates is not None:
            self.templates = check_templates("attack 'paraphrase'", "templates", self.templates)


class ParaphraseAttack(Attack):
    """The concept in held-out wordings, scored per wording (module docstring).

    Args:
        config: the attack's settings.
        context: the pipeline, concept, classifier and world it attacks.
    """

    def run(self) -> AttackOutcome:
        """Score every held-out wording; the accuracy is over all their images (per wording in the details).

        Returns:
            The accuracy under attack, its optimisation steps, the number of images scored and per-kind details.
        """
        ctx = self.context
        templates = self.config.templates or default_heldout_templates(ctx.world, ctx.axis, ctx.domain)
        per_template: dict[str, float] = {}
        all_hits: list[bool] = []
        for template in templates:
            hits = ctx.hits(ctx.images(ctx.pipe, ctx.prompts([template]), f"paraphrase {template!r}"))
            per_template[template] = 100.0 * sum(hits) / len(hits)
            all_hits += hits
        return AttackOutcome(
            accuracy=100.0 * sum(all_hits) / len(all_hits),
            steps=0,
            num_images=len(all_hits),
            details={"templates": list(templates), "accuracy_per_template": per_template,
                     "best_template": max(per_template, key=per_template.get)},
        )
