"""Serve a mixed stream (styles and objects, ``bench.streams``) under each protocol and score it after every k-th
request: UA over everything removed so far (and per domain), IRA over the kept styles, CRA over the kept objects,
what the removed concepts' prompts keep of the other domain, held-out UA and the per-concept matrix.

Each request goes through the same engine call as in a one-domain bench (``runner.request_kwargs`` with the
request's domain and that domain's settings). What is scored (``score_stream``), on every style x object image of
the evaluation at its seeds:

* a removed concept: its own classifier on all of its images (a removed style must be gone whatever the object);
* a kept concept (the stream's scored set, fixed over the stream): its own classifier on its images drawn with kept
  concepts of the other domain only, so that a removal of the other domain does not count against it;
* ``cross_removed``: the object classifier on the removed styles' images of kept objects (the object in a removed
  style's prompt should still be drawn); ``cross_removed_object``: the style classifier on the removed objects'
  images in kept styles.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .._validation import check_int
from .._version import __version__
from ..evaluation import kv_drift
from ..evaluation.distributed import generate_and_classify
from ..evaluation.metrics import DOMAINS
from ..evaluation.retention import EvalReference, extract_features, frechet_distance, relative_image_change
from ..mixins.attach import attach
from ..objectives import OBJECTIVES, TrainedObjectiveConfig
from .heldout import heldout_unlearning
from .protocols import Hyperparameters, Protocol, method_hyperparameters, resolve_protocols
from .runner import BenchSettings, ca_anchor, check_launch, protocol_job, request_kwargs
from .streams import Stream, get_stream
from .world import BenchWorld


def _accuracy(hits: Sequence[bool]) -> float | None:
    return 100.0 * sum(hits) / len(hits) if hits else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_stream(cases: Sequence[tuple[Any, ...]], style_predictions: Sequence[str],
                 object_predictions: Sequence[str], removed: Mapping[str, Sequence[str]],
                 kept: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """UA, IRA and CRA of a mixed stream from the intended ``(style, object, ...)`` of each image and the two
    classifiers' answers (module docstring).

    Args:
        cases: ``(style, object, ...)`` per image.
        style_predictions: the style classifier's label per image.
        object_predictions: the object classifier's label per image.
        removed: ``{"style": [...], "object": [...]}``, the concepts removed so far.
        kept: ``{"style": [...], "object": [...]}``, the scored kept concepts (disjoint from ``removed``).

    Returns:
        ``ua`` (100 - the mean accuracy over every removed concept, both domains), ``ua_style``, ``ua_object``,
        ``ira`` (mean over the kept styles), ``cra`` (mean over the kept objects), ``accuracy`` (every concept of the
        images, on all of its images), ``kept_accuracy`` (each kept concept, on its images with kept concepts),
        ``cross_removed``, ``cross_removed_object`` and ``num_images``; percentages, None where undefined.

    Raises:
        ValueError: predictions that do not match the cases, a removed or kept concept without images, or a concept
            both removed and kept.
    """
    if not (len(cases) == len(style_predictions) == len(object_predictions)):
        raise ValueError(f"need one prediction per image: {len(cases)} images, {len(style_predictions)} style and "
                         f"{len(object_predictions)} object predictions")
    predictions = {"style": style_predictions, "object": object_predictions}
    axis = {"style": 0, "object": 1}
    removed = {d: list(dict.fromkeys(removed.get(d, []))) for d in DOMAINS}
    kept = {d: list(dict.fromkeys(kept.get(d, []))) for d in DOMAINS}
    for domain in DOMAINS:
        present = {case[axis[domain]] for case in cases}
        missing = [c for c in [*removed[domain], *kept[domain]] if c not in present]
        both = sorted(set(removed[domain]) & set(kept[domain]))
        if missing or both:
            raise ValueError(f"{domain}s {missing or both} " + ("have no images among the cases" if missing else
                                                                 "are both removed and kept"))

    def own(domain: str, rows: Sequence[int], concept: str) -> float | None:
        return _accuracy([predictions[domain][i] == concept for i in rows])

    def rows_of(domain: str, concept: str, other_in: Sequence[str] | None = None) -> list[int]:
        other = 1 - axis[domain]
        return [i for i, case in enumerate(cases) if case[axis[domain]] == concept
                and (other_in is None or case[other] in other_in)]

    accuracy: dict[str, float | None] = {}
    kept_accuracy: dict[str, float | None] = {}
    for domain in DOMAINS:
        other = "object" if domain == "style" else "style"
        for concept in dict.fromkeys(case[axis[domain]] for case in cases):
            accuracy[concept] = own(domain, rows_of(domain, concept), concept)
        for concept in kept[domain]:
            kept_accuracy[concept] = own(domain, rows_of(domain, concept, kept[other]), concept)
    ua = {d: _mean([100.0 - accuracy[c] for c in removed[d]]) for d in DOMAINS}  # type: ignore[operator]
    every_removed = [100.0 - accuracy[c] for d in DOMAINS for c in removed[d]]  # type: ignore[operator]
    # the other domain's kept concepts drawn in a removed concept's prompt
    cross = {}
    for domain in DOMAINS:
        other = "object" if domain == "style" else "style"
        rows = [i for c in removed[domain] for i in rows_of(domain, c, kept[other])]
        cross[domain] = _accuracy([predictions[other][i] == cases[i][axis[other]] for i in rows])
    return {
        "ua": _mean(every_removed),
        "ua_style": ua["style"],
        "ua_object": ua["object"],
        "ira": _mean([v for c, v in kept_accuracy.items() if c in kept["style"] and v is not None]),
        "cra": _mean([v for c, v in kept_accuracy.items() if c in kept["object"] and v is not None]),
        "accuracy": accuracy,
        "kept_accuracy": kept_accuracy,
        "cross_removed": cross["style"],
        "cross_removed_object": cross["object"],
        "num_images": len(cases),
    }


@dataclass
class StreamSettings:
    """One run of a mixed stream.

    Args:
        stream: a registered stream name (``bench.streams.STREAMS``) or a ``Stream``.
        requests: serve only the first n requests (None: all of them).
        every: score after every ``every``-th request (and always after the last); the others record their cost
            and drift only. Evaluating is most of a run's time.
        method: the erasure method of the trained protocols (the closed-form ones solve).
        protocols: protocol names (None: every protocol that serves one request at a time).
        hparams: per domain, the trained protocols' settings (None, or a missing domain: the method's for that
            domain, ``method_hyperparameters``).
        negative_guidance: ESD's eta.
        reference: ESD's reference prediction ("context" or "empty").
        anchor: Concept Ablation's anchor for both domains (None: the world's per domain, else a generic word).
        trajectories_per_prompt: frozen-model trajectories per request prompt.
        seed: request k (1-based) uses seed ``seed + k - 1`` in every protocol.
    """

    stream: Stream | str = "mixed36"
    requests: int | None = None
    every: int = 1
    method: str = "esd"
    protocols: Sequence[str] | None = None
    hparams: Mapping[str, Hyperparameters] | None = None
    negative_guidance: float = 1.0
    reference: str = "context"
    anchor: str | None = None
    trajectories_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.stream = get_stream(self.stream)
        self.stream.head(self.requests)
        check_int(self.every, "every", minimum=1)
        if self.protocols is None:
            self.protocols = [p.name for p in resolve_protocols(None) if not p.simultaneous]
        self.protocols = [p.name for p in resolve_protocols(self.protocols)]  # a list of names, however given
        simultaneous = [p.name for p in resolve_protocols(self.protocols) if p.simultaneous]
        if simultaneous:
            raise ValueError(f"protocol(s) {simultaneous} retrain every request so far at once in one prompt domain; "
                             f"a mixed stream has two: choose protocols that serve one request at a time")
        hparams = dict(self.hparams or {})
        unknown = sorted(set(hparams) - set(DOMAINS))
        if unknown:
            raise ValueError(f"hparams domains must be 'style' / 'object', got {unknown}")
        self.hparams = {d: hparams.get(d) or method_hyperparameters(self.method, d) for d in DOMAINS}
        for domain in DOMAINS:  # BenchSettings validates every other field, once per domain
            self.for_domain(domain)

    @property
    def served(self) -> list[tuple[str, str]]:
        """The ``(domain, concept)`` requests this run serves."""
        return self.stream.head(self.requests)  # type: ignore[union-attr]

    def scored(self, k: int) -> bool:
        """Whether the state after request ``k`` is evaluated (every ``every``-th request, the base and the last).

        Args:
            k: the request's position, 1-based; 0 is the base model.

        Returns:
            True when that state is scored.
        """
        return k == 0 or k % self.every == 0 or k == len(self.served)

    def for_domain(self, domain: str) -> BenchSettings:
        """The one-domain settings a request of the stream is served with.

        Args:
            domain: "style" or "object".

        Returns:
            The bench's one-domain settings, with this stream's protocols and that domain's hyperparameters.
        """
        hparams = self.hparams[domain]  # type: ignore[index]
        return BenchSettings(requests=1, domain=domain, method=self.method, protocols=self.protocols,
                             hparams=hparams, negative_guidance=self.negative_guidance,
                             reference=self.reference, anchor=self.anchor,
                             trajectories_per_prompt=self.trajectories_per_prompt, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the stream by name), as the results record them.

        Returns:
            Every field by name.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["stream"] = self.stream.name  # type: ignore[union-attr]
        values["hparams"] = {d: h.to_dict() for d, h in self.hparams.items()}  # type: ignore[union-attr]
        values["protocols"] = list(self.protocols)  # type: ignore[arg-type]
        return values


def evaluate_stream(world: BenchWorld, stream: Stream, pipe: Any, removed: Sequence[tuple[str, str]],
                    progress: bool = False, reference: EvalReference | None = None) -> dict[str, Any]:
    """Score ``pipe`` after the ``(domain, concept)`` removals ``removed`` on ``world``'s evaluation images
    (``score_stream``), with held-out UA per domain, the kept-image change and Fréchet distance against
    ``reference`` (images with kept concepts only), and the images (``"images"``, not saved).

    Args:
        world: the stream's world (``streams.stream_world``).
        stream: the stream (its scored kept concepts).
        pipe: the pipeline to evaluate.
        removed: the requests served so far.
        progress: progress bars.
        reference: the base model's evaluation images.

    Returns:
        The scores (``score_stream``'s keys, ``ua_heldout`` and its per-domain parts, ``heldout_accuracy``,
        ``heldout_images``, ``image_change``, ``frechet``, ``eval_seconds``), ``"images"`` and ``"labels"`` (the
        style and the object classifier's, per image); the last two are not saved.
    """
    started = time.perf_counter()
    config = world.eval_config
    cases = config.cases()
    images, (styles, objects) = generate_and_classify(
        pipe, [config.prompt(s, o) for s, o, _ in cases], [seed for _, _, seed in cases],
        (world.style_classifier, world.object_classifier), num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale, batch_size=config.batch_size, height=config.height,
        width=config.width, progress=progress, desc=f"evaluating ({len(removed)} removed)")
    by_domain = {d: [c for dd, c in removed if dd == d] for d in DOMAINS}
    kept = {d: stream.kept_concepts(d) for d in DOMAINS}
    scores = score_stream(cases, styles, objects, by_domain, kept)
    scores["image_change"] = scores["frechet"] = None
    if reference is not None:
        clean = [i for i, (s, o, _) in enumerate(cases) if s in kept["style"] and o in kept["object"]]
        images_cpu = images.detach().float().cpu()
        scores["image_change"] = relative_image_change(images_cpu, reference.images, cases, clean)
        if reference.features is not None and world.feature_extractor is not None and len(clean) >= 2:
            features = extract_features(world.feature_extractor, images_cpu[clean])
            scores["frechet"] = frechet_distance(features, reference.features[clean])
    heldout = {d: heldout_unlearning(pipe, world, by_domain[d], d, progress) for d in DOMAINS}
    found = {d: h for d, h in heldout.items() if h is not None}
    accuracy = {c: a for h in found.values() for c, a in h["accuracy"].items()}
    scores.update(ua_heldout=_mean([100.0 - a for a in accuracy.values()]) if accuracy else None,
                  ua_heldout_style=found["style"]["ua"] if "style" in found else None,
                  ua_heldout_object=found["object"]["ua"] if "object" in found else None,
                  heldout_accuracy=accuracy or None, heldout_images=sum(h["num_images"] for h in found.values()))
    scores["eval_seconds"] = round(time.perf_counter() - started, 3)
    scores["images"], scores["labels"] = images, (styles, objects)
    return scores


SCORE_KEYS = ("ua", "ua_style", "ua_object", "ira", "cra", "cross_removed", "cross_removed_object", "image_change",
              "frechet", "ua_heldout", "ua_heldout_style", "ua_heldout_object", "accuracy", "kept_accuracy",
              "heldout_accuracy", "heldout_images", "eval_seconds", "num_images")


def _row(k: int, request: tuple[str, str] | None, scores: dict[str, Any] | None, drift: float, steps: int,
         seconds: float, cum_steps: int, cum_seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"request": k, "domain": None if request is None else request[0],
                           "concept": None if request is None else request[1], "scored": scores is not None,
                           "drift": drift, "steps": steps, "seconds": round(seconds, 3),
                           "cumulative_steps": cum_steps, "cumulative_seconds": round(cum_seconds, 3)}
    row.update({key: None if scores is None else scores.get(key) for key in SCORE_KEYS})
    return row


def _summary(scores: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    return (f"UA {pct(scores['ua'])} (styles {pct(scores['ua_style'])}, objects {pct(scores['ua_object'])})  "
            f"IRA {pct(scores['ira'])}  CRA {pct(scores['cra'])}  kept-in-removed {pct(scores['cross_removed'])}  "
            f"UA held-out {pct(scores['ua_heldout'])}")


def run_stream_protocol(world: BenchWorld, settings: StreamSettings, protocol: Protocol, base_row: dict[str, Any],
                        *, progress: bool = True, log: Callable[[str], None] | None = None,
                        reference: EvalReference | None = None) -> list[dict[str, Any]]:
    """Serve the stream under one protocol on a fresh pipeline; one row per request after ``base_row`` (scores on
    the rows ``settings.scored`` picks, cost and drift on every row).

    Args:
        world: the stream's world.
        settings: the run.
        protocol: a protocol that serves one request at a time.
        base_row: the base model's row (row 0).
        progress: progress bars.
        log: receives one line per request.
        reference: the base model's evaluation images (``runner.base_reference``).

    Returns:
        The rows, base first.
    """
    say = log or (lambda message: None)
    requests = settings.served
    stream: Stream = settings.stream  # type: ignore[assignment]
    pipe = attach(world.load_pipeline())
    rows = [dict(base_row)]
    cum_steps, cum_seconds = 0, 0.0
    for k, (domain, concept) in enumerate(requests, start=1):
        kwargs = request_kwargs(world, settings.for_domain(domain), protocol, concept,
                                [c for _, c in requests[: k - 1]])
        record = pipe.unlearn(**kwargs, seed=settings.seed + k - 1, progress=progress)
        steps, seconds = int(record.steps), float(record.seconds)
        cum_steps, cum_seconds = cum_steps + steps, cum_seconds + seconds
        drift = kv_drift(pipe)
        scores = evaluate_stream(world, stream, pipe, requests[:k], progress, reference) \
            if settings.scored(k) else None
        rows.append(_row(k, (domain, concept), scores, drift, steps, seconds, cum_steps, cum_seconds))
        scored = "" if scores is None else f"  {_summary(scores)}  eval {scores['eval_seconds']:.1f}s"
        say(f"[{protocol.name}] request {k}/{len(requests)} {domain} {concept!r}:{scored}  drift {drift:.4f}  "
            f"{'solve' if steps == 0 else 'train'} {seconds:.1f}s ({steps} steps)")
    return rows


def run_stream_bench(world: BenchWorld, settings: StreamSettings, *, progress: bool = True,
                     log: Callable[[str], None] | None = print, command: str | None = None, jobs: int = 1,
                     world_factory: Callable[[], BenchWorld] | None = None) -> dict[str, Any]:
    """Run every protocol of ``settings`` on the stream's ``world``; returns the results as a JSON-able dict.

    Args:
        world: the stream's world (``streams.stream_world`` / ``streams.minicanvas_stream_world``).
        settings: the run.
        progress: progress bars.
        log: receives the log lines (None: silent).
        command: the command line that ran it, for the report.
        jobs: protocols run in that many worker processes (one torch thread each).
        world_factory: a picklable callable that rebuilds ``world`` in a worker (``jobs > 1``).

    Returns:
        ``{"kind": "stream", "stream", "requests", "world", "settings", "base", "base_removed", "protocols",
        "seconds", "command", "environment"}``; ``base_removed``: the base model's images scored as if every
        request of the run were served (the base figures of UA per concept and of ``cross_removed``).

    Raises:
        ValueError: a world that does not evaluate the stream, ``jobs > 1`` without ``world_factory`` or on
            launched processes, a trained protocol whose batch does not split over the processes, or Concept
            Ablation anchored on a removed concept.
    """
    say = log or (lambda message: None)
    started = time.perf_counter()
    stream: Stream = settings.stream  # type: ignore[assignment]
    requests = settings.served
    for domain in DOMAINS:
        evaluated = world.eval_config.concepts(domain)
        missing = [c for c in [*stream.removed(domain), *stream.kept_concepts(domain)] if c not in evaluated]
        if missing:
            raise ValueError(f"world {world.name!r} does not evaluate the stream's {domain}s {missing}: build it "
                             f"with bench.stream_world(world, {stream.name!r})")
    protocols = resolve_protocols(settings.protocols)
    processes = check_launch(jobs, world_factory)
    for domain in DOMAINS:
        hp = settings.hparams[domain]  # type: ignore[index]
        trained = [p.name for p in protocols
                   if issubclass(OBJECTIVES[p.method or settings.method][0], TrainedObjectiveConfig)]
        if processes > 1 and trained and hp.batch_size % processes:
            raise ValueError(f"on {processes} processes the trained protocols {trained} train data-parallel: the "
                             f"{domain} batch size {hp.batch_size} must be a multiple of {processes}")
        if settings.method == "ca":
            anchor = ca_anchor(settings.for_domain(domain), world)
            if anchor in [c for _, c in requests]:
                raise ValueError(f"Concept Ablation's {domain} anchor {anchor!r} is removed in this stream; choose "
                                 f"another (anchor=, --anchor)")

    base_pipe = attach(world.load_pipeline())
    base = evaluate_stream(world, stream, base_pipe, [], progress)
    reference = EvalReference.from_images(base.pop("images"), world.feature_extractor)
    # the base images scored as if the whole run were served: the base's cross_removed and per-concept figures
    base_removed = score_stream(world.eval_config.cases(), *base.pop("labels"),
                                {d: [c for dd, c in requests if dd == d] for d in DOMAINS},
                                {d: stream.kept_concepts(d) for d in DOMAINS})
    say("removal order: " + ", ".join(f"{k}. {c} ({d})" for k, (d, c) in enumerate(requests, start=1)))
    say(f"base model: {_summary(base)}  [{base['eval_seconds']:.1f}s]")
    base_row = _row(0, None, base, 0.0, 0, 0.0, 0, 0.0)
    del base_pipe

    results: dict[str, list[dict[str, Any]]] = {}
    if jobs == 1:
        for protocol in tqdm(protocols, desc="stream", unit="protocol", disable=not progress):
            results[protocol.name] = run_stream_protocol(world, settings, protocol, base_row, progress=progress,
                                                         log=say, reference=reference)
    else:
        # spawn: forked workers would inherit torch's thread pools and any locks held at fork time
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(protocol_job, world_factory, settings, p.name, base_row, 1, reference.images,
                                   run_stream_protocol)
                       for p in protocols]
            for future in as_completed(futures):
                name, rows, lines = future.result()
                for line in lines:
                    say(line)
                results[name] = rows
    return {
        "format": 1,
        "kind": "stream",
        "stream": stream.describe(),
        "requests": [{"domain": d, "concept": c} for d, c in requests],
        "world": world.describe(),
        "settings": settings.to_dict(),
        "base": base,
        "base_removed": base_removed,
        "protocols": {p.name: {"label": p.label, "description": p.description, "method": p.method or settings.method,
                               "rows": results[p.name]} for p in protocols},
        "seconds": round(time.perf_counter() - started, 1),
        "command": command,
        "environment": {"diffusers_unlearn": __version__, "torch": torch.__version__, "jobs": jobs,
                        "processes": processes, "threads": torch.get_num_threads() if jobs == 1 else 1,
                        "machine": platform.machine(), "processor": platform.processor() or platform.machine()},
    }
