"""The continual-unlearning benchmark: a stream of removal requests under each protocol, UA / IRA / CRA after
every request, results table and plots. ``diffusers-unlearn bench`` runs it on MiniCanvas.

>>> from diffusers_unlearn import bench
>>> world = bench.minicanvas_world(eval_seeds=2)
>>> result = bench.run_bench(world, bench.BenchSettings(requests=6))
>>> bench.write_report(result, "bench-results")
"""

from .protocols import PROTOCOLS, Hyperparameters, Protocol, ProtocolContext, resolve_protocols
from .report import markdown, plot_cost, plot_metrics, write_report
from .runner import DEFAULT_ANCHORS, BenchSettings, request_kwargs, run_bench, run_protocol, serve_request
from .world import BenchWorld, family_round_robin, minicanvas_world

__all__ = [
    "DEFAULT_ANCHORS",
    "PROTOCOLS",
    "BenchSettings",
    "BenchWorld",
    "Hyperparameters",
    "Protocol",
    "ProtocolContext",
    "family_round_robin",
    "markdown",
    "minicanvas_world",
    "plot_cost",
    "plot_metrics",
    "request_kwargs",
    "resolve_protocols",
    "run_bench",
    "run_protocol",
    "serve_request",
    "write_report",
]
