"""The continual-unlearning benchmark: a stream of removal requests under each protocol, UA / IRA / CRA after
every request, results table and plots. ``diffusers-unlearn bench`` runs it on MiniCanvas.

>>> from diffusers_unlearn import bench
>>> world = bench.minicanvas_world(eval_seeds=2)
>>> result = bench.run_bench(world, bench.BenchSettings(requests=12))
>>> bench.write_report(result, "bench-results")
"""

from .protocols import (METHOD_TRAINING, PROTOCOLS, Hyperparameters, Protocol, ProtocolContext, method_hyperparameters,
                        resolve_protocols)
from .report import markdown, plot_cost, plot_metrics, write_report
from .heldout import heldout_cases, heldout_unlearning
from .report import plot_ua_matrix, ua_matrix
from .runner import DEFAULT_ANCHORS, BenchSettings, ca_anchor, request_kwargs, run_bench, run_protocol, serve_request
from .world import MINICANVAS_EVAL_OBJECTS, BenchWorld, family_round_robin, minicanvas_style_plan, minicanvas_world

__all__ = [
    "DEFAULT_ANCHORS",
    "ca_anchor",
    "MINICANVAS_EVAL_OBJECTS",
    "PROTOCOLS",
    "BenchSettings",
    "BenchWorld",
    "Hyperparameters",
    "METHOD_TRAINING",
    "Protocol",
    "ProtocolContext",
    "family_round_robin",
    "heldout_cases",
    "heldout_unlearning",
    "markdown",
    "method_hyperparameters",
    "minicanvas_style_plan",
    "minicanvas_world",
    "plot_cost",
    "plot_metrics",
    "plot_ua_matrix",
    "request_kwargs",
    "resolve_protocols",
    "run_bench",
    "run_protocol",
    "serve_request",
    "ua_matrix",
    "write_report",
]
