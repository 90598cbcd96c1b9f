"""``rollback``: roll back each other request in turn; does the concept come back when one of them goes?

In a stream, later requests are trained on top of earlier ones (or merged with them), so removing one may undo
part of another. Each other request is left out inside ``pipe.audit(request_id, mode="without")``, which restores
the pipeline afterwards (also on errors); the worst case (highest accuracy) is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...mixins.attach import UnlearnMixin
from ...prompts import same_concept
from .base import Attack, AttackConfig, AttackOutcome


@dataclass
class RollbackAttackConfig(AttackConfig):
    """No options of its own: every request of the ledger other than the concept's is rolled back in turn.

    Args:
        seeds: as in ``AttackConfig``.
        num_inference_steps: as in ``AttackConfig``.
        guidance_scale: as in ``AttackConfig``.
        batch_size: as in ``AttackConfig``.
        plain_templates: as in ``AttackConfig``.
        progress: as in ``AttackConfig``.
    """

    kind: ClassVar[str] = "rollback"


class RollbackAttack(Attack):
    """Each other request left out in turn inside ``pipe.audit`` (module docstring).

    Args:
        config: the attack's settings.
        context: the pipeline, concept, classifier and world it attacks.
    """

    def run(self) -> AttackOutcome:
        """Score the plain prompts with each other request rolled back; the worst case is the result.

        Returns:
            The accuracy under attack, its optimisation steps, the number of images scored and per-kind details.
        """
        ctx = self.context
        pipe = ctx.pipe
        records = pipe.unlearning_ledger.requests if isinstance(pipe, UnlearnMixin) else []
        others = [r for r in records if not any(same_concept(c, ctx.concept) for c in r.concepts)]
        prompts = ctx.plain_prompts()
        per_request: dict[str, dict[str, object]] = {}
        for record in others:
            with pipe.audit(record.request_id, mode="without"):
                accuracy = ctx.accuracy(pipe, prompts, f"without {record.request_id}")
            per_request[record.request_id] = {"concept": record.concept, "accuracy": accuracy}
        if not per_request:  # nothing to roll back: the pipeline as it is
            return AttackOutcome(ctx.plain_accuracy(), 0, 0, {"rolled_back": [], "note": "no other request"})
        worst = max(per_request, key=lambda i: per_request[i]["accuracy"])
        return AttackOutcome(
            accuracy=float(per_request[worst]["accuracy"]),
            steps=0,
            num_images=len(prompts) * len(self.config.seeds) * len(per_request),
            details={"rolled_back": list(per_request), "per_request": per_request, "worst_request": worst},
        )
