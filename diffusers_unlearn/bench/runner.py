"""Run a stream of removal requests under each protocol and evaluate UA / IRA / CRA after every request."""

from __future__ import annotations

import dataclasses
import multiprocessing
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from .._validation import check_count, check_int, check_number, check_seed
from .._version import __version__
from ..engine.defaults import RECOMMENDED_DOMAIN_OPTIONS, recommended_escalation
from ..evaluation import ATTACKS, attack, evaluate_unlearning, kv_drift
from ..evaluation.distributed import launched_processes
from ..evaluation.metrics import check_eval_domain
from ..evaluation.retention import EvalReference
from ..mixins.attach import attach
from ..objectives import OBJECTIVES, ObjectiveConfig, TrainedObjectiveConfig, build_objective_config
from ..objectives.esd import REFERENCES as ESD_REFERENCES
from ..prompts import concepts_except
from .heldout import heldout_unlearning
from .protocols import Hyperparameters, Protocol, ProtocolContext, method_hyperparameters, resolve_protocols
from .world import BenchWorld

# Concept Ablation maps a concept onto an anchor in the same prompt slot. MiniCanvas's text encoder never saw these
# words in that slot, so they act as a generic "no particular style / object" anchor (a world may name a better one,
# ``BenchWorld.anchors``).
DEFAULT_ANCHORS = {"style": "painting", "object": "picture"}


@dataclass
class BenchSettings:
    """One benchmark run.

    Args:
        requests: length of the removal stream (the first concepts of the world's order for ``domain``).
        domain: "style" or "object".
        method: a registered erasure method ("esd", "ca", ...; see ``objectives.OBJECTIVES``).
        protocols: protocol names (see ``bench.PROTOCOLS``); None: all of them.
        hparams: steps, learning rate, rank and regularizer strengths, shared by every protocol (None: the method's
            for the domain, ``method_hyperparameters``).
        negative_guidance: ESD's eta (ESD's own 1).
        reference: ESD's reference prediction: "context" (default: the prompt without the concept) or "empty"
            (ESD's own). The bench's prompts name an object beside the style; steering away from the empty prompt
            steers away from the object too, from the prompt without the style it does not
            (docs/benchmarks/minicanvas.md, calibration).
        anchor: Concept Ablation's anchor (default: the world's for the domain, ``BenchWorld.anchors``, else a generic
            word of the domain, ``DEFAULT_ANCHORS``; ``ca_anchor`` resolves it).
        trajectories_per_prompt: frozen-model trajectories per request prompt (one prompt per template).
        seed: request k uses seed ``seed + k`` in every protocol.
        attacks: recovery attack kinds (``evaluation.ATTACKS``) run on every removed concept after the last request;
            their robust UA (100 - attack accuracy) joins the results.
        attack_steps: optimisation steps of the embedding and finetune attacks (None: their defaults).
    """

    requests: int = 6
    domain: str = "style"
    method: str = "esd"
    protocols: Sequence[str] | None = None
    hparams: Hyperparameters | None = None
    negative_guidance: float = 1.0
    reference: str = "context"
    anchor: str | None = None
    trajectories_per_prompt: int = 1
    seed: int = 0
    attacks: Sequence[str] = ()
    attack_steps: int | None = None

    def __post_init__(self) -> None:
        check_eval_domain(self.domain)
        self.attacks = check_attacks(self.attacks)
        if self.attack_steps is not None:
            check_count(self.attack_steps, "attack_steps")
        if self.method not in OBJECTIVES:
            raise ValueError(f"bench method must be a registered method {sorted(OBJECTIVES)}, got {self.method!r}")
        if self.hparams is None:
            self.hparams = method_hyperparameters(self.method, self.domain)
        self.protocols = [p.name for p in resolve_protocols(self.protocols)]
        check_int(self.requests, "requests", minimum=1)
        check_int(self.trajectories_per_prompt, "trajectories_per_prompt", minimum=1)
        check_number(self.negative_guidance, "negative_guidance", minimum=0)
        if self.reference not in ESD_REFERENCES:
            raise ValueError(f"reference must be one of {list(ESD_REFERENCES)}, got {self.reference!r}")
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, for the bench report.

        Returns:
            The settings as a dict.
        """
        return dataclasses.asdict(self)


def ca_anchor(settings: BenchSettings, world: BenchWorld) -> str:
    """Concept Ablation's anchor for ``settings`` on ``world``: the explicit one, the world's, or the generic word.

    Args:
        settings: the bench settings (``anchor`` and ``domain``).
        world: the bench world (its ``anchors``).

    Returns:
        The anchor concept.
    """
    return settings.anchor or world.anchors.get(settings.domain) or DEFAULT_ANCHORS[settings.domain]


def check_attacks(attacks: Sequence[str] | str | None) -> list[str]:
    """Attack kinds by name (a list or a comma-separated string), each a registered kind."""
    if attacks is None:
        return []
    names = [a.strip() for a in attacks.split(",") if a.strip()] if isinstance(attacks, str) else list(attacks)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack kind(s) {unknown}; allowed: {sorted(ATTACKS)}")
    return list(dict.fromkeys(names))


def attack_removed(world: BenchWorld, settings: BenchSettings, pipe: Any, removed: Sequence[str],
                   progress: bool = True) -> dict[str, Any]:
    """Every attack of ``settings`` on every removed concept; per kind, robust UA = 100 - mean attack accuracy."""
    config = world.eval_config
    classifier = world.style_classifier if settings.domain == "style" else world.object_classifier
    axis_template = (config.template.format(object=o, style="{}") for o in config.objects) \
        if settings.domain == "style" else (config.template.format(object="{}", style=s) for s in config.styles)
    shared = dict(seeds=list(config.seeds), num_inference_steps=config.num_inference_steps,
                  guidance_scale=config.guidance_scale, batch_size=config.batch_size,
                  plain_templates=list(axis_template), progress=progress)
    out: dict[str, Any] = {}
    for kind in settings.attacks:
        options = dict(shared)
        if settings.attack_steps is not None and kind in ("embedding", "finetune"):
            options["steps"] = settings.attack_steps
        results = [attack(pipe, concept, kind, domain=world.prompt_domain(settings.domain), classifier=classifier,
                          seed=settings.seed, world=world.eval_world, **options) for concept in removed]
        accuracy = sum(r.accuracy for r in results) / len(results)
        plain = sum(r.plain_accuracy for r in results) / len(results)
        out[kind] = {
            "robust_ua": 100.0 - accuracy,
            "ua": 100.0 - plain,
            "accuracy": {r.concept: r.accuracy for r in results},
            "plain_accuracy": {r.concept: r.plain_accuracy for r in results},
            "steps": sum(r.steps for r in results),
            "seconds": round(sum(r.seconds for r in results), 3),
            "settings": {k: v for k, v in results[0].settings.items() if k != "plain_prompts"},
        }
    return out


def _objective(settings: BenchSettings, world: BenchWorld, concepts: Sequence[str], num_prompts: int,
               method: str | None = None, removed: Sequence[str] = ()) -> ObjectiveConfig:
    """The method config of one request over ``concepts`` (several: a simultaneous retraining), ``removed`` the
    concepts removed before it (kept out of its retain loss)."""
    config = world.eval_config
    common: dict[str, Any] = dict(sampling_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                                  num_trajectories=num_prompts * settings.trajectories_per_prompt)
    method = method or settings.method  # a protocol may name its own method
    if method == "closed_form":  # keeps every other concept of the world, and the earlier removals
        # the library's recommended settings for the domain (engine/defaults.py), as pipe.unlearn(concept, domain=...) uses
        return build_objective_config("closed_form", dict(common, vocabulary=world.vocabulary(),
                                                          **RECOMMENDED_DOMAIN_OPTIONS.get(settings.domain, {})))
    if settings.hparams.preserve_weight > 0 and issubclass(OBJECTIVES[method][0], TrainedObjectiveConfig):
        pool = world.vocabulary()[world.prompt_domain(settings.domain)]
        common.update(keep=concepts_except(pool, [*concepts, *removed]), keep_weight=settings.hparams.preserve_weight)
    several = {"concepts": tuple(concepts)} if len(concepts) > 1 else {}
    if settings.method == "esd":
        return build_objective_config("esd", dict(common, negative_guidance=settings.negative_guidance,
                                                  reference=settings.reference,
                                                  **(several if settings.reference == "context" else {})))
    if settings.method == "ca":
        return build_objective_config("ca", dict(common, anchor=ca_anchor(settings, world), **several))
    return build_objective_config(settings.method, common)  # another registered method: its own defaults


def request_kwargs(world: BenchWorld, settings: BenchSettings, protocol: Protocol, concept: str,
                   removed: Sequence[str] = ()) -> dict[str, Any]:
    """``pipe.unlearn`` keyword arguments of one request for ``concept`` under a non-simultaneous ``protocol`` (all
    but the seed), ``removed`` the concepts removed before it: the world's prompt domain, the method config,
    training settings, regularizers and strategy; a verified protocol adds the world's erasure check and its
    escalation, any other protocol of the recommended method the recommended escalation (``pipe.unlearn``'s).
    ``diffusers-unlearn unlearn <world>`` uses them too (see ``bench.recipes``).

    Args:
        world: the bench world.
        settings: the bench settings.
        protocol: a protocol that is not simultaneous.
        concept: the concept to remove.
        removed: the concepts removed before it.

    Returns:
        The keyword arguments.

    Raises:
        ValueError: the method or a regularizer would keep an evaluated concept (``BenchWorld.check_request``).
    """
    if protocol.simultaneous:
        raise ValueError(f"protocol {protocol.name!r} retrains every request at once; it has no single-request form")
    world.register_domains()  # here, where requests need them: in worker processes too
    ctx = ProtocolContext(settings.hparams, world.vocabulary())
    hp = settings.hparams
    method = _objective(settings, world, [concept], len(world.templates(settings.domain)), protocol.method, removed)
    if protocol.verify:
        checked = dict(erasure_check=world.erasure_check(settings.domain),
                       escalate=list(protocol.escalate.get(settings.domain, ())))
    else:  # the recommended settings come with their escalation, as pipe.unlearn(concept, domain=...) serves them
        ladder = recommended_escalation(settings.domain, method.method)
        checked = dict(escalate=ladder) if ladder else {}
    if protocol.options.get(settings.domain):
        method = dataclasses.replace(method, **protocol.options[settings.domain])
    kwargs = dict(
        **checked,
        concept=concept,
        method=method,
        domain=world.prompt_domain(settings.domain), steps=hp.steps, learning_rate=hp.learning_rate, rank=hp.rank,
        batch_size=hp.batch_size, regularizers=protocol.build_regularizers(ctx), strategy=protocol.strategy(ctx),
    )
    world.check_request(kwargs)  # nothing it keeps may be a concept retention is scored on
    return kwargs


def serve_request(pipe: Any, protocol: Protocol, world: BenchWorld, settings: BenchSettings, stream: Sequence[str],
                  k: int, progress: bool = True) -> tuple[int, float]:
    """Serve request ``k`` (0-based) of ``stream`` on ``pipe`` under ``protocol``.

    A simultaneous protocol rolls every request back and retrains on all of ``stream[:k + 1]`` at once.

    Args:
        pipe: the attached pipeline serving the stream.
        protocol: how the requests are served.
        world: the bench world.
        settings: the bench settings.
        stream: the concepts to remove, in order.
        k: the request's index in ``stream``.
        progress: show progress bars.

    Returns:
        (training steps, seconds) of the request.
    """
    if not protocol.simultaneous:
        record = pipe.unlearn(**request_kwargs(world, settings, protocol, stream[k], stream[:k]),
                              seed=settings.seed + k, progress=progress)
        return int(record.steps), float(record.seconds)
    world.register_domains()  # here, where requests need them: in worker processes too
    hp = settings.hparams
    domain = world.prompt_domain(settings.domain)
    templates = world.templates(settings.domain)
    for request_id in list(pipe.unlearning_ledger.ids()):
        pipe.rollback(request_id)
    concepts = list(stream[: k + 1])
    prompts = [t.format(c) for c in concepts for t in templates]
    objective = _objective(settings, world, concepts, len(prompts))
    world.check_request({"method": objective})
    record = pipe.unlearn(
        "+".join(concepts), objective, domain=domain,
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
        # the other domain kept in the removed concepts' own prompts (objects drawn in a removed style's prompt)
        "cross_removed": scores.cross_removed,
        # kept concepts' images against the base's at the same seed, in seed gaps; their features' Fréchet distance
        "image_change": scores.image_change,
        "frechet": scores.frechet,
        # the removed concepts in wordings the model was never trained on (None: no held-out wordings / nothing removed)
        "ua_heldout": None if heldout is None else heldout["ua"],
        "heldout_accuracy": None if heldout is None else heldout["accuracy"],
        "heldout_images": 0 if heldout is None else heldout["num_images"],
    }


def _erasure_figures(record: Any, protocol: Protocol) -> dict[str, Any]:
    """A request's erasure check as a results row keeps it (the probe's prompts are the request's own), with the
    settings a verified protocol escalates, as the request finally used them."""
    figures = {k: v for k, v in record.erasure.items() if k != "probe"}
    escalated = sorted({key for steps in protocol.escalate.values() for step in steps for key in step})
    if escalated:
        figures["settings"] = {key: record.method_config.get(key) for key in escalated}
    return figures


def _evaluate(world: BenchWorld, settings: BenchSettings, pipe: Any, removed: Sequence[str], progress: bool,
              reference: EvalReference | None = None) -> Any:
    return evaluate_unlearning(pipe, removed, settings.domain, world.style_classifier, world.object_classifier,
                               world.eval_config, progress=progress, reference=reference,
                               feature_extractor=world.feature_extractor)


def base_reference(world: BenchWorld, base_scores: Any) -> EvalReference:
    """The base model's evaluation images (and features) that every later state is compared with."""
    return EvalReference.from_images(base_scores.images, world.feature_extractor)


def run_protocol(world: BenchWorld, settings: BenchSettings, protocol: Protocol, base_row: dict[str, Any], *,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 on_request: Callable[[], None] | None = None,
                 reference: EvalReference | None = None) -> list[dict[str, Any]]:
    """Serve the whole stream under one protocol on a fresh pipeline; one row per request after ``base_row``.

    Args:
        world: the bench world (a fresh pipeline comes from it).
        settings: the bench settings.
        protocol: how the requests are served.
        base_row: the base model's row (row 0).
        progress: show progress bars.
        log: where progress lines go (None: nowhere).
        on_request: called after each request (e.g. to advance a shared progress bar).
        reference: the base model's evaluation images (``base_reference``), for the image-change measures.

    Returns:
        The rows, ``base_row`` first.
    """
    say = log or (lambda message: None)
    stream = world.stream(settings.domain, settings.requests)
    pipe = attach(world.load_pipeline())
    rows = [dict(base_row)]
    cum_steps, cum_seconds = 0, 0.0
    for k in range(len(stream)):
        steps, seconds = serve_request(pipe, protocol, world, settings, stream, k, progress)
        cum_steps, cum_seconds = cum_steps + steps, cum_seconds + seconds
        scores = _evaluate(world, settings, pipe, stream[: k + 1], progress, reference)
        heldout = heldout_unlearning(pipe, world, stream[: k + 1], settings.domain, progress)
        drift = kv_drift(pipe)
        rows.append(_row(k + 1, stream[k], scores, drift, steps, seconds, cum_steps, cum_seconds, heldout))
        rows[-1]["erasure"] = _erasure_figures(pipe.unlearning_ledger.requests[-1], protocol)
        held = "" if heldout is None else f"  UA held-out {heldout['ua']:.1f}"
        say(f"[{protocol.name}] request {k + 1}/{len(stream)} {stream[k]!r}: {scores.summary()}{held}  "
            f"drift {drift:.4f}  train {seconds:.1f}s ({steps} steps)  eval {scores.seconds:.1f}s")
        if settings.attacks and k == len(stream) - 1:
            rows[-1]["attacks"] = attack_removed(world, settings, pipe, stream, progress)
            say(f"[{protocol.name}] robust UA: " + ", ".join(
                f"{kind} {a['robust_ua']:.1f} ({a['seconds']:.0f}s)" for kind, a in rows[-1]["attacks"].items()))
        if on_request is not None:
            on_request()
    return rows


def protocol_job(world_factory: Callable[[], BenchWorld], settings: Any, name: str, base_row: dict[str, Any],
                 threads: int, base_images: torch.Tensor | None = None,
                 run: Callable[..., list[dict[str, Any]]] | None = None
                 ) -> tuple[str, list[dict[str, Any]], list[str]]:
    """One protocol in a worker process (``jobs > 1``): its rows and its log lines. ``run`` serves the protocol
    (``run_protocol``, the default; a stream passes its own)."""
    torch.set_num_threads(threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    lines: list[str] = []
    world = world_factory()
    reference = None if base_images is None else EvalReference.from_images(base_images, world.feature_extractor)
    rows = (run or run_protocol)(world, settings, resolve_protocols([name])[0], base_row, progress=False,
                                 log=lines.append, reference=reference)
    return name, rows, lines


def check_launch(jobs: int, world_factory: Callable[[], BenchWorld] | None) -> int:
    """Refuse worker jobs the bench cannot serve; return the number of launched processes.

    Args:
        jobs: protocols run in parallel worker processes.
        world_factory: what workers rebuild the world with (needed when ``jobs > 1``).

    Returns:
        The processes the bench was launched on (1 without a launcher).

    Raises:
        ValueError: ``jobs`` below 1, several jobs without a world factory, or several jobs on several processes.
    """
    check_int(jobs, "jobs", minimum=1)
    if jobs > 1 and world_factory is None:
        raise ValueError("jobs > 1 needs a picklable world_factory: worker processes rebuild the world")
    processes = launched_processes()
    if jobs > 1 and processes > 1:
        raise ValueError(f"jobs must be 1 on {processes} launched processes: they share out each evaluation's "
                         f"images, not protocols")
    return processes


def run_bench(world: BenchWorld, settings: BenchSettings, *, progress: bool = True,
              log: Callable[[str], None] | None = print, command: str | None = None, jobs: int = 1,
              world_factory: Callable[[], BenchWorld] | None = None) -> dict[str, Any]:
    """Run every protocol of ``settings`` on ``world``; returns the results as a JSON-able dict.

    Row 0 of every protocol is the base model (evaluated once); row k is the state after request k.
    ``jobs > 1`` runs protocols in that many worker processes (one torch thread each), which rebuild the world
    with ``world_factory`` (a picklable callable, e.g. ``functools.partial(minicanvas_world, ...)``).
    Launched on several processes (``accelerate launch`` / ``torch.distributed.run``, ``bench --processes N``),
    every process serves the same stream and each evaluation's images are shared out among them
    (``evaluation.distributed``): a solved request is solved alike in every process, and scores equal one
    process's exactly; a trained request trains data-parallel (the trainer's mode under a launcher: each process
    an equal share of the batch, gradients averaged), equal to one process's to float rounding. Then ``jobs`` must
    be 1 and a trained protocol's batch size a multiple of the processes.

    Args:
        world: the bench world.
        settings: the bench settings (protocols, stream length, method, training settings).
        progress: show progress bars.
        log: where progress lines go (None: nowhere).
        command: the command line, recorded in the results.
        jobs: worker processes for the protocols.
        world_factory: rebuilds the world in a worker process (needed with ``jobs > 1``).

    Returns:
        The results: settings, world, stream, base row and each protocol's rows.

    Raises:
        ValueError: ``jobs > 1`` without a ``world_factory``, ``jobs > 1`` or an indivisible batch size under a
            launcher, or a Concept Ablation anchor that the stream removes.
    """
    say = log or (lambda message: None)
    started = time.perf_counter()
    stream = world.stream(settings.domain, settings.requests)
    protocols = resolve_protocols(settings.protocols)
    processes = check_launch(jobs, world_factory)
    trained = [p.name for p in protocols
               if issubclass(OBJECTIVES[p.method or settings.method][0], TrainedObjectiveConfig)]
    if processes > 1 and trained and settings.hparams.batch_size % processes:
        raise ValueError(f"on {processes} processes the trained protocols {trained} train data-parallel (each "
                         f"process an equal share of the batch): batch_size {settings.hparams.batch_size} must be a "
                         f"multiple of {processes} (--batch-size)")
    if settings.method == "ca":  # the results record the anchor every request used
        settings = dataclasses.replace(settings, anchor=ca_anchor(settings, world))
        if settings.anchor in stream:
            raise ValueError(f"Concept Ablation's anchor {settings.anchor!r} is removed at request "
                             f"{stream.index(settings.anchor) + 1} of this stream; choose another (anchor=, --anchor)")

    base_pipe = attach(world.load_pipeline())
    base = _evaluate(world, settings, base_pipe, [], progress)
    reference = base_reference(world, base)
    say(f"removal order ({settings.domain}): " + ", ".join(f"{k + 1}. {c}" for k, c in enumerate(stream)))
    say(f"base model: {base.summary()}  [{base.seconds:.1f}s]")
    base_row = _row(0, None, base, 0.0, 0, 0.0, 0, 0.0)
    del base_pipe

    results: dict[str, Any] = {}
    if jobs == 1:
        outer = tqdm(total=len(protocols) * len(stream), desc="bench", unit="request", disable=not progress)
        for protocol in protocols:
            rows = run_protocol(world, settings, protocol, base_row, progress=progress, log=say,
                                on_request=lambda: outer.update(1), reference=reference)
            results[protocol.name] = rows
        outer.close()
    else:
        # Costliest first (simultaneous retrains on the whole stream), so the workers finish together.
        order = sorted(protocols, key=lambda p: not p.simultaneous)
        # spawn: forked workers would inherit torch's thread pools and any locks held at fork time
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(protocol_job, world_factory, settings, p.name, base_row, 1, reference.images)
                       for p in order]
            with tqdm(total=len(futures), desc="bench", unit="protocol", disable=not progress) as outer:
                for future in as_completed(futures):
                    name, rows, lines = future.result()
                    for line in lines:
                        say(line)
                    results[name] = rows
                    outer.update(1)
    results = {p.name: {"label": p.label, "description": p.description, "method": p.method or settings.method,
                        "rows": results[p.name]} for p in protocols}
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
            "processes": processes,
            "threads": torch.get_num_threads() if jobs == 1 else 1,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        },
    }
