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
from .mixed import StreamSettings, evaluate_stream, run_stream_bench, run_stream_protocol, score_stream
from .report import plot_ua_matrix, ua_matrix
from .runner import DEFAULT_ANCHORS, BenchSettings, ca_anchor, request_kwargs, run_bench, run_protocol, serve_request
from .stream_report import markdown_stream, plot_stream_metrics, write_stream_report
from .streams import STREAMS, Stream, get_stream, minicanvas_stream_world, register_stream, stream_world
from .world import MINICANVAS_EVAL_OBJECTS, BenchWorld, family_round_robin, minicanvas_style_plan, minicanvas_world

__all__ = [
    "DEFAULT_ANCHORS",
    "ca_anchor",
    "MINICANVAS_EVAL_OBJECTS",
    "PROTOCOLS",
    "STREAMS",
    "Stream",
    "StreamSettings",
    "BenchSettings",
    "BenchWorld",
    "Hyperparameters",
    "METHOD_TRAINING",
    "Protocol",
    "ProtocolContext",
    "evaluate_stream",
    "family_round_robin",
    "get_stream",
    "heldout_cases",
    "heldout_unlearning",
    "markdown",
    "markdown_stream",
    "method_hyperparameters",
    "minicanvas_style_plan",
    "minicanvas_stream_world",
    "minicanvas_world",
    "plot_cost",
    "plot_metrics",
    "plot_stream_metrics",
    "register_stream",
    "plot_ua_matrix",
    "request_kwargs",
    "resolve_protocols",
    "run_bench",
    "run_protocol",
    "run_stream_bench",
    "run_stream_protocol",
    "score_stream",
    "serve_request",
    "stream_world",
    "ua_matrix",
    "write_report",
    "write_stream_report",
]
