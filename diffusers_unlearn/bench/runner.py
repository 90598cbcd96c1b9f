"""Run a stream of removal requests under each protocol and evaluate UA / IRA / CRA after every request."""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..evaluation import evaluate_unlearning, kv_drift
from ..evaluation.metrics import check_eval_domain
from ..mixin import attach
from ..objectives import OBJECTIVES, ObjectiveConfig, build_objective_config
from .heldout import heldout_unlearning
from .protocols import Hyperparameters, Protocol, ProtocolContext, resolve_protocols
from .world import BenchWorld

# Concept Ablation maps a concept onto an anchor in the same prompt slot. MiniCanvas's text encoder never saw these
# words in that slot, so they act as a generic "no particular style / object" anchor.
DEFAULT_ANCHORS = {"style": "painting", "object": "picture"}


@dataclass
class BenchSettings:
    """One benchmark run.

    Args:
        requests: length of the removal stream (the first concepts of the world's order for ``domain``).
        domain: "style" or "object".
        method: a registered erasure method ("esd", "ca", ...; see ``objectives.OBJECTIVES``).
        protocols: protocol names (see ``bench.PROTOCOLS``); None: all of them.
        hparams: steps, learning rate, rank and regularizer strengths, shared by every protocol.
        negative_guidance: ESD's eta. 5 rather than ESD's usual 1: on MiniCanvas, eta 1 to 3 did not reliably
            remove a style within the per-request step budget.
        anchor: Concept Ablation's anchor (default: a generic word of the domain, ``DEFAULT_ANCHORS``).
        trajectories_per_prompt: frozen-model trajectories per request prompt (one prompt per template).
        seed: request k uses seed ``seed + k`` in every protocol.
    """

    requests: int = 6
    domain: str = "style"
    method: str = "esd"
    protocols: Sequence[str] | None = None
    hparams: Hyperparameters = field(default_factory=Hyperparameters)
    negative_guidance: float = 5.0
    anchor: str | None = None
    trajectories_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_eval_domain(self.domain)
        if self.method not in OBJECTIVES:
            raise ValueError(f"bench method must be a registered method {sorted(OBJECTIVES)}, got {self.method!r}")
        self.protocols = [p.name for p in resolve_protocols(self.protocols)]
        if isinstance(self.requests, bool) or not isinstance(self.requests, int) or self.requests < 1:
            raise ValueError(f"requests must be an integer >= 1, got {self.requests!r}")
        if isinstance(self.trajectories_per_prompt, bool) or not isinstance(self.trajectories_per_prompt, int) \
                or self.trajectories_per_prompt < 1:
            raise ValueError(f"trajectories_per_prompt must be an integer >= 1, got {self.trajectories_per_prompt!r}")
        if self.method == "ca" and self.anchor is None:
            self.anchor = DEFAULT_ANCHORS[self.domain]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _objective(settings: BenchSettings, world: BenchWorld, concepts: Sequence[str],
               num_prompts: int) -> ObjectiveConfig:
    """The method config of one request over ``concepts`` (several: a simultaneous retraining)."""
    config = world.eval_config
    common = dict(sampling_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                  num_trajectories=num_prompts * settings.trajectories_per_prompt)
    if settings.method == "esd":
        return build_objective_config("esd", dict(common, negative_guidance=settings.negative_guidance))
    if settings.method == "ca":
        several = {"concepts": tuple(concepts)} if len(concepts) > 1 else {}
        return build_objective_config("ca", dict(common, anchor=settings.anchor, **several))
    return build_objective_config(settings.method, common)  # another registered method: its own defaults


def request_kwargs(world: BenchWorld, settings: BenchSettings, protocol: Protocol, concept: str) -> dict[str, Any]:
    """``pipe.unlearn`` keyword arguments of one request for ``concept`` under a non-simultaneous ``protocol`` (all
    but the seed): the world's prompt domain, the method config, training settings, regularizers and strategy.
    ``diffusers-unlearn unlearn <world>`` uses them too (see ``bench.recipes``)."""
    if protocol.simultaneous:
        raise ValueError(f"protocol {protocol.name!r} retrains every request at once; it has no single-request form")
    world.register_domains()  # here, where requests need them: in worker processes too
    ctx = ProtocolContext(settings.hparams, world.vocabulary())
    hp = settings.hparams
    return dict(
        concept=concept, method=_objective(settings, world, [concept], len(world.templates(settings.domain))),
        domain=world.prompt_domain(settings.domain), steps=hp.steps, learning_rate=hp.learning_rate, rank=hp.rank,
        batch_size=hp.batch_size, regularizers=protocol.build_regularizers(ctx), strategy=protocol.strategy(ctx),
    )


def serve_request(pipe: Any, protocol: Protocol, world: BenchWorld, settings: BenchSettings, stream: Sequence[str],
                  k: int, progress: bool = True) -> tuple[int, float]:
    """Serve request ``k`` (0-based) of ``stream`` on ``pipe`` under ``protocol``; returns (training steps, seconds)."""
    if not protocol.simultaneous:
        record = pipe.unlearn(**request_kwargs(world, settings, protocol, stream[k]), seed=settings.seed + k,
                              progress=progress)
        return int(record.steps), float(record.seconds)
    world.register_domains()  # here, where requests need them: in worker processes too
    hp = settings.hparams
    domain = world.prompt_domain(settings.domain)
    templates = world.templates(settings.domain)
    for request_id in list(pipe.unlearning_ledger.ids()):
        pipe.rollback(request_id)
    concepts = list(stream[: k + 1])
    prompts = [t.format(c) for c in concepts for t in templates]
    record = pipe.unlearn(
        "+".join(concepts), _objective(settings, world, concepts, len(prompts)), domain=domain,
        steps=hp.steps * len(concepts), seed=settings.seed + k, learning_rate=hp.learning_rate, rank=hp.rank,
        batch_size=hp.batch_size, prompts=prompts, progress=progress,
    )
    return int(record.steps), float(record.seconds)


def _row(k: int, concept: str | None, scores: Any, drift: float, steps: int, seconds: float,
         cum_steps: int, cum_seconds: float, heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "request": k,
        "concept": concept,
        "ua": scores.ua,
        "ira": scores.ira,
        "cra": scores.cra,
        "drift": drift,
        "steps": steps,
        "seconds": round(seconds, 3),
        "cumulative_steps": cum_steps,
        "cumulative_seconds": round(cum_seconds, 3),
        "eval_seconds": scores.seconds,
        "accuracy": scores.accuracy,
        "cross_accuracy": scores.cross_accuracy,
        # the removed concepts in wordings the model was never trained on (None: no held-out wordings / nothing removed)
        "ua_heldout": None if heldout is None else heldout["ua"],
        "heldout_accuracy": None if heldout is None else heldout["accuracy"],
        "heldout_images": 0 if heldout is None else heldout["num_images"],
    }


def _evaluate(world: BenchWorld, settings: BenchSettings, pipe: Any, removed: Sequence[str], progress: bool) -> Any:
    return evaluate_unlearning(pipe, removed, settings.domain, world.style_classifier, world.object_classifier,
                               world.eval_config, progress=progress)


def run_protocol(world: BenchWorld, settings: BenchSettings, protocol: Protocol, base_row: dict[str, Any], *,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 on_request: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Serve the whole stream under one protocol on a fresh pipeline; one row per request after ``base_row``."""
    say = log or (lambda message: None)
    stream = world.stream(settings.domain, settings.requests)
    pipe = attach(world.load_pipeline())
    rows = [dict(base_row)]
    cum_steps, cum_seconds = 0, 0.0
    for k in range(len(stream)):
        steps, seconds = serve_request(pipe, protocol, world, settings, stream, k, progress)
        cum_steps, cum_seconds = cum_steps + steps, cum_seconds + seconds
        scores = _evaluate(world, settings, pipe, stream[: k + 1], progress)
        heldout = heldout_unlearning(pipe, world, stream[: k + 1], settings.domain, progress)
        drift = kv_drift(pipe)
        rows.append(_row(k + 1, stream[k], scores, drift, steps, seconds, cum_steps, cum_seconds, heldout))
        held = "" if heldout is None else f"  UA held-out {heldout['ua']:.1f}"
        say(f"[{protocol.name}] request {k + 1}/{len(stream)} {stream[k]!r}: {scores.summary()}{held}  "
            f"drift {drift:.4f}  train {seconds:.1f}s ({steps} steps)  eval {scores.seconds:.1f}s")
        if on_request is not None:
            on_request()
    return rows


def _protocol_job(world_factory: Callable[[], BenchWorld], settings: BenchSettings, name: str,
                  base_row: dict[str, Any], threads: int) -> tuple[str, list[dict[str, Any]], list[str]]:
    """One protocol in a worker process (``jobs > 1``): its rows and its log lines."""
    torch.set_num_threads(threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    lines: list[str] = []
    rows = run_protocol(world_factory(), settings, resolve_protocols([name])[0], base_row, progress=False,
                        log=lines.append)
    return name, rows, lines


def run_bench(world: BenchWorld, settings: BenchSettings, *, progress: bool = True,
              log: Callable[[str], None] | None = print, command: str | None = None, jobs: int = 1,
              world_factory: Callable[[], BenchWorld] | None = None) -> dict[str, Any]:
    """Run every protocol of ``settings`` on ``world``; returns the results as a JSON-able dict.

    Row 0 of every protocol is the base model (evaluated once); row k is the state after request k.
    ``jobs > 1`` runs protocols in that many worker processes (one torch thread each), which rebuild the world
    with ``world_factory`` (a picklable callable, e.g. ``functools.partial(minicanvas_world, ...)``).
    """
    say = log or (lambda message: None)
    started = time.perf_counter()
    stream = world.stream(settings.domain, settings.requests)
    protocols = resolve_protocols(settings.protocols)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if jobs > 1 and world_factory is None:
        raise ValueError("jobs > 1 needs a picklable world_factory: worker processes rebuild the world")

    base_pipe = attach(world.load_pipeline())
    base = _evaluate(world, settings, base_pipe, [], progress)
    say(f"removal order ({settings.domain}): " + ", ".join(f"{k + 1}. {c}" for k, c in enumerate(stream)))
    say(f"base model: {base.summary()}  [{base.seconds:.1f}s]")
    base_row = _row(0, None, base, 0.0, 0, 0.0, 0, 0.0)
    del base_pipe

    results: dict[str, Any] = {}
    if jobs == 1:
        outer = tqdm(total=len(protocols) * len(stream), desc="bench", unit="request", disable=not progress)
        for protocol in protocols:
            rows = run_protocol(world, settings, protocol, base_row, progress=progress, log=say,
                                on_request=lambda: outer.update(1))
            results[protocol.name] = rows
        outer.close()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # Costliest first (simultaneous retrains on the whole stream), so the workers finish together.
        order = sorted(protocols, key=lambda p: not p.simultaneous)
        # spawn: forked workers would inherit torch's thread pools and any locks held at fork time
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_protocol_job, world_factory, settings, p.name, base_row, 1) for p in order]
            with tqdm(total=len(futures), desc="bench", unit="protocol", disable=not progress) as outer:
                for future in as_completed(futures):
                    name, rows, lines = future.result()
                    for line in lines:
                        say(line)
                    results[name] = rows
                    outer.update(1)
    results = {p.name: {"label": p.label, "description": p.description, "rows": results[p.name]} for p in protocols}
    return {
        "format": 1,
        "world": world.describe(),
        "settings": settings.to_dict(),
        "stream": list(stream),
        "base": base.to_dict(),
        "protocols": results,
        "seconds": round(time.perf_counter() - started, 1),
        "command": command,
        "environment": {
            "diffusers_unlearn": __version__,
            "torch": torch.__version__,
            "jobs": jobs,
            "threads": torch.get_num_threads() if jobs == 1 else 1,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
    }
