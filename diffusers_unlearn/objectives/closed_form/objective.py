"""``ClosedFormObjective``: the closed form as a solved method."""

from __future__ import annotations

from typing import Any

from ...kv.adapters import RequestAdapter
from ..base import SolvedObjective, SolveContext, prompts_by_concept
from .config import ClosedFormConfig
from .solver import solve


class ClosedFormObjective(SolvedObjective):
    """Solves one request with ``solve``; re-solves it after a rollback, since each request is solved on top of,
    and keeping mapped, the ones before it. A request of several concepts is one joint solve: every concept's token
    pairs (from the prompts that name it) map onto the anchor together, with the same weight.

    Args:
        config: the closed-form settings.
    """

    config: ClosedFormConfig

    def solve(self, context: SolveContext) -> tuple[RequestAdapter, dict[str, Any]]:
        """The request's change and the solve's report (see ``solver.solve``).

        Args:
            context: the request and the model as it finds it.

        Returns:
            The artifact (LoRA factors of every K/V layer) and the report (with ``mapped_concepts``, the number of
            concepts solved together, for a request of several).

        Raises:
            ValueError: as ``solver.solve``; a concept of several that no prompt names.
        """
        concepts = context.removed
        groups = prompts_by_concept(context.prompts, concepts) if len(concepts) > 1 else {concepts[0]:
                                                                                            context.prompts}
        first, *others = concepts
        adapter, report = solve(context.pipe, concept=first, domain=context.domain, prompts=groups[first],
                                config=self.config, base_weights=context.base_weights,
                                start_offsets=context.start_offsets, earlier=context.earlier,
                                progress=context.progress, also=[(c, groups[c]) for c in others])
        if others:
            report["mapped_concepts"] = len(concepts)
        return adapter, report

    def after_rollback(self, context: SolveContext) -> RequestAdapter:
        """The request solved again on the requests that remain before it.

        Args:
            context: the request and the model as it now finds it.

        Returns:
            The new artifact.
        """
        return self.solve(context)[0]
