"""``ClosedFormObjective``: the closed form as a solved method."""

from __future__ import annotations

from typing import Any

from ...kv.adapters import RequestAdapter
from ..base import SolvedObjective, SolveContext
from .config import ClosedFormConfig
from .solver import solve


class ClosedFormObjective(SolvedObjective):
    """Solves one request with ``solve``; re-solves it after a rollback, since each request is solved on top of,
    and keeping mapped, the ones before it.

    Args:
        config: the closed-form settings.
    """

    config: ClosedFormConfig

    def solve(self, context: SolveContext) -> tuple[RequestAdapter, dict[str, Any]]:
        """The request's change and the solve's report (see ``solver.solve``).

        Args:
            context: the request and the model as it finds it.

        Returns:
            The artifact (LoRA factors of every K/V layer) and the report.
        """
        return solve(context.pipe, concept=context.concept, domain=context.domain, prompts=context.prompts,
                     config=self.config, base_weights=context.base_weights, start_offsets=context.start_offsets,
                     earlier=context.earlier, progress=context.progress)

    def after_rollback(self, context: SolveContext) -> RequestAdapter:
        """The request solved again on the requests that remain before it.

        Args:
            context: the request and the model as it now finds it.

        Returns:
            The new artifact.
        """
        return self.solve(context)[0]
