"""UnlearnCanvas's metrics for any pipeline and any pair of classifiers, plus K/V drift and per-request cost.

For removed concepts of one domain (styles or objects), on images of every style x object prompt at fixed seeds:

* UA (unlearning accuracy) = 100 - accuracy of that domain's classifier on the removed concepts' images,
* IRA (in-domain retain accuracy) = mean accuracy of that classifier on each kept concept's images,
* CRA (cross-domain retain accuracy) = accuracy of the other domain's classifier on the kept concepts' images.

Accuracies are percentages, averaged per concept (every concept has the same number of images, so this is also
the plain image average). CRA leaves out the removed concepts' images: it measures what the model keeps. What the
removed concepts' own prompts keep of the other domain (the bear in "a bear in <removed style> style") is scored
apart, as ``cross_removed``: an erasure should redirect the prompt, not destroy it.

Given the base model's images (``retention.EvalReference``), the kept concepts' images are also compared with the
base's at the same seed (``image_change``, relative to the seed-to-seed gap) and, with a feature extractor, by a
Fréchet distance of their features (``frechet``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..kv import adapters as ad
from .._validation import check_int, check_number, check_seed
from ..families.registry import denoiser_of
from ..mixins.attach import UnlearnMixin
from ..engine.state import unlearning_state
from ..worlds import get_world
from .classifiers import Classifier
from .distributed import classify_batches, generate_and_classify
from .retention import EvalReference, FeatureExtractor, extract_features, frechet_distance, relative_image_change

Domain = Literal["style", "object"]
DOMAINS: tuple[str, ...] = ("style", "object")
UNLEARNCANVAS_TEMPLATE = "A {object} image in {style} style."
UNLEARNCANVAS_SEEDS: tuple[int, ...] = (188, 288, 588, 688, 888)


def check_eval_domain(domain: str) -> Domain:
    if domain not in DOMAINS:
        raise ValueError(f"evaluation domain must be one of {list(DOMAINS)}, got {domain!r}")
    return domain  # type: ignore[return-value]


@dataclass
class EvalConfig:
    """What to generate: every style x object prompt at every seed, and how to sample it.

    Args:
        styles: the style concepts (names the style classifier answers with).
        objects: the object concepts (names the object classifier answers with).
        template: prompt with ``{object}`` and ``{style}`` slots (UnlearnCanvas: "A {object} image in {style} style.").
        seeds: one image per prompt and seed (UnlearnCanvas: 188, 288, 588, 688, 888). Fewer seeds = a cheaper subset.
        num_inference_steps: the pipeline's sampling steps (UnlearnCanvas: 100 DDIM steps).
        guidance_scale: the pipeline's guidance scale (UnlearnCanvas: 9.0).
        batch_size: images per pipeline call.
        height: image height (default: the pipeline's).
        width: image width (default: the pipeline's).
    """

    styles: Sequence[str]
    objects: Sequence[str]
    template: str = UNLEARNCANVAS_TEMPLATE
    seeds: Sequence[int] = UNLEARNCANVAS_SEEDS
    num_inference_steps: int = 100
    guidance_scale: float = 9.0
    batch_size: int = 64
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        for name in ("styles", "objects"):
            values = getattr(self, name)
            if isinstance(values, str) or not values or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"EvalConfig {name} must be a non-empty list of names, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"EvalConfig {name} has duplicates: {list(values)}")
            setattr(self, name, list(values))
        if not isinstance(self.template, str) or "{object}" not in self.template or "{style}" not in self.template:
            raise ValueError(f"EvalConfig template needs '{{object}}' and '{{style}}' slots, got {self.template!r}")
        if isinstance(self.seeds, (str, int)) or not self.seeds:
            raise ValueError(f"EvalConfig seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        self.seeds = [check_seed(s, "EvalConfig seeds") for s in self.seeds]
        for name in ("num_inference_steps", "batch_size"):
            check_int(getattr(self, name), f"EvalConfig {name}", minimum=1)
        check_number(self.guidance_scale, "EvalConfig guidance_scale", minimum=0)

    @classmethod
    def minicanvas(cls, seeds: Sequence[int] | int | None = None, **overrides: Any) -> EvalConfig:
        """Deprecated (kept one release): ``du.minicanvas.eval_world().eval_config(seeds, **overrides)``.

        Args:
            seeds: the seeds, or an integer n for the first n of MiniCanvas's ``EVAL_SEEDS`` (default: all).
            **overrides: any other ``EvalConfig`` field.

        Returns:
            MiniCanvas's concepts, prompt and recommended sampling as an ``EvalConfig``.
        """
        warnings.warn("EvalConfig.minicanvas(...) is deprecated: use du.minicanvas.eval_world().eval_config(...) "
                      "(evaluation takes a world; it knows none of its own)", FutureWarning, stacklevel=2)
        return get_world("minicanvas").evaluation_world().eval_config(seeds, **overrides)

    def concepts(self, domain: str) -> list[str]:
        """The evaluated concepts of one domain.

        Args:
            domain: "style" or "object".

        Returns:
            ``styles`` or ``objects`` as a list.

        Raises:
            ValueError: ``domain`` is neither.
        """
        return list(self.styles if check_eval_domain(domain) == "style" else self.objects)

    def prompt(self, style: str, obj: str) -> str:
        """The template filled with one style and one object.

        Args:
            style: the style filled into ``{style}``.
            obj: the object filled into ``{object}``.

        Returns:
            The prompt.
        """
        return self.template.format(style=style, object=obj)

    def cases(self) -> list[tuple[str, str, int]]:
        """Every (style, object, seed) the evaluation generates, seed-major."""
        return [(s, o, seed) for seed in self.seeds for s in self.styles for o in self.objects]

    def to_dict(self) -> dict[str, Any]:
        """Every field, for the scores' record of what was evaluated.

        Returns:
            The fields as a dict.
        """
        return dataclasses.asdict(self)


@dataclass
class UnlearningScores:
    """UA / IRA / CRA (percent; None where undefined: no removed, or no kept, concept) and their details.

    Attributes:
        domain: the removed concepts' domain, "style" or "object".
        removed: the removed concepts.
        ua: unlearning accuracy: 100 minus the classifier's accuracy on the removed concepts' images.
        ira: in-domain retain accuracy: the same classifier's accuracy on the kept concepts' images.
        cra: cross-domain retain accuracy: the other domain's classifier on the kept concepts' images.
        accuracy: per concept of ``domain``, its classifier's accuracy on that concept's images.
        cross_accuracy: per concept of the other domain, on the kept concepts' images.
        num_images: how many images were scored.
        seconds: wall time of the evaluation.
        config: the ``EvalConfig`` as a dict.
        cross_removed: the other domain's classifier on the removed concepts' images.
        image_change: kept concepts' images against the base's at the same seed, relative to the base's seed gap
            (needs a reference).
        frechet: Fréchet distance of the kept concepts' image features to the base's (needs a reference with
            features).
        images: the scored images (not saved).
    """

    domain: Domain
    removed: list[str]
    ua: float | None
    ira: float | None
    cra: float | None
    accuracy: dict[str, float]  # per concept of ``domain``: its classifier's accuracy on that concept's images
    cross_accuracy: dict[str, float]  # per concept of the other domain, on the kept concepts' images
    num_images: int
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    # the other domain's classifier on the removed concepts' images (objects kept in removed-style prompts)
    cross_removed: float | None = None
    # kept concepts' images against the base's at the same seed, relative to the base's seed gap (needs a reference)
    image_change: float | None = None
    # Fréchet distance of the kept concepts' image features to the base's (needs a reference with features)
    frechet: float | None = None
    images: torch.Tensor | None = field(default=None, repr=False, compare=False)  # the scored images, not saved

    def to_dict(self) -> dict[str, Any]:
        """Every field but the images, JSON-ready.

        Returns:
            The scores as a dict.
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "images"}

    def summary(self) -> str:
        """One line: UA, IRA, CRA and, where measured, the kept-in-removed accuracy and the image change.

        Returns:
            The line, e.g. for a log or a progress message.
        """
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.1f}"

        text = f"UA {pct(self.ua)}  IRA {pct(self.ira)}  CRA {pct(self.cra)}"
        if self.cross_removed is not None:
            text += f"  kept-in-removed {pct(self.cross_removed)}"
        if self.image_change is not None:
            text += f"  image change {self.image_change:.2f}x seed gap"
        return text + f"  ({self.num_images} images)"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_predictions(
    cases: Sequence[tuple[str, str, int]] | Sequence[tuple[str, str]],
    style_predictions: Sequence[str],
    object_predictions: Sequence[str],
    removed: Sequence[str],
    domain: str,
) -> UnlearningScores:
    """UA / IRA / CRA from the intended ``(style, object, ...)`` of each image and the two classifiers' answers.

    Args:
        cases: the intended ``(style, object)`` or ``(style, object, seed)`` of each image.
        style_predictions: the style classifier's answer per image.
        object_predictions: the object classifier's answer per image.
        removed: the removed concepts of ``domain``.
        domain: "style" or "object".

    Returns:
        The scores (without images, timing or config).

    Raises:
        ValueError: the predictions do not match the images one to one, or a removed concept was not evaluated.
    """
    domain = check_eval_domain(domain)
    if not (len(cases) == len(style_predictions) == len(object_predictions)):
        raise ValueError(f"need one prediction per image: {len(cases)} images, {len(style_predictions)} style and "
                         f"{len(object_predictions)} object predictions")
    axis, other = (0, 1) if domain == "style" else (1, 0)
    own_pred, other_pred = (style_predictions, object_predictions) if domain == "style" else \
        (object_predictions, style_predictions)
    concepts = list(dict.fromkeys(case[axis] for case in cases))
    removed = list(dict.fromkeys(removed))
    unknown = [c for c in removed if c not in concepts]
    if unknown:
        raise ValueError(f"removed {domain}(s) {unknown} are not among the evaluated {domain}s {concepts}")

    def accuracy(pairs: list[tuple[str, str]]) -> float:
        return 100.0 * sum(p == t for p, t in pairs) / len(pairs)

    accuracy_by: dict[str, float] = {}
    for concept in concepts:
        accuracy_by[concept] = accuracy([(own_pred[i], concept) for i, c in enumerate(cases) if c[axis] == concept])
    kept_rows = [i for i, c in enumerate(cases) if c[axis] not in removed]
    cross_by: dict[str, float] = {}
    for concept in dict.fromkeys(cases[i][other] for i in kept_rows):
        cross_by[concept] = accuracy([(other_pred[i], concept) for i in kept_rows if cases[i][other] == concept])
    removed_acc = _mean([accuracy_by[c] for c in removed])
    removed_rows = [i for i, c in enumerate(cases) if c[axis] in removed]
    return UnlearningScores(
        domain=domain,
        removed=removed,
        ua=None if removed_acc is None else 100.0 - removed_acc,
        ira=_mean([accuracy_by[c] for c in concepts if c not in removed]),
        cra=_mean(list(cross_by.values())),
        accuracy=accuracy_by,
        cross_accuracy=cross_by,
        num_images=len(cases),
        cross_removed=accuracy([(other_pred[i], cases[i][other]) for i in removed_rows]) if removed_rows else None,
    )


def evaluate_unlearning(
    pipe: Any,
    removed: Sequence[str],
    domain: str,
    style_classifier: Classifier,
    object_classifier: Classifier,
    config: EvalConfig,
    *,
    progress: bool = True,
    images: torch.Tensor | None = None,
    reference: EvalReference | None = None,
    feature_extractor: FeatureExtractor | None = None,
    accelerator: Any = None,
) -> UnlearningScores:
    """Generate ``config``'s images with ``pipe`` (or take ``images``, in ``config.cases()`` order) and score them.

    Each image is seeded by its own case's seed, never by the process that draws it: launched on several processes
    (``accelerate launch`` / ``torch.distributed.run``), the images' batches are shared out and gathered again
    (``evaluation.distributed``), and every process returns the scores one process computes.

    Args:
        pipe: the pipeline to evaluate (the same in every process).
        removed: the removed concepts of ``domain``.
        domain: "style" or "object".
        style_classifier: ``images -> style labels``.
        object_classifier: ``images -> object labels``.
        config: what to generate and how to sample it.
        progress: a progress bar (on the main process).
        images: the images of ``config.cases()`` instead of generating them.
        reference: the base model's images of the same cases (``EvalReference.from_images(base_scores.images)``);
            with it the kept concepts' images are compared with the base's (``image_change``, and ``frechet`` when
            the reference has features and ``feature_extractor`` is given).
        feature_extractor: ``images -> [B, F]`` features for the Fréchet distance.
        accelerator: the processes to split the images over: an ``accelerate.Accelerator`` or ``PartialState``;
            None (default): all the launched processes, if several; False: this process alone.

    Returns:
        The ``UnlearningScores``, with the scored images on ``scores.images``.

    Raises:
        ValueError: a bad domain, a removed concept outside the evaluation, images that do not match the cases or
            the reference, or a classifier that answers the wrong number of labels.
    """
    domain = check_eval_domain(domain)
    cases = config.cases()
    started = time.perf_counter()
    classifiers = (style_classifier, object_classifier)
    if images is None:
        images, (style_labels, object_labels) = generate_and_classify(
            pipe, [config.prompt(s, o) for s, o, _ in cases], [seed for _, _, seed in cases], classifiers,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            batch_size=config.batch_size, height=config.height, width=config.width, progress=progress,
            desc=f"evaluating ({len(removed)} removed)", accelerator=accelerator,
        )
    elif len(images) != len(cases):
        raise ValueError(f"got {len(images)} images for {len(cases)} evaluation cases")
    else:
        style_labels, object_labels = classify_batches(classifiers, images, config.batch_size)
    scores = score_predictions(cases, style_labels, object_labels, removed, domain)
    if reference is not None:
        if reference.images.shape != images.shape:
            raise ValueError(f"reference images {tuple(reference.images.shape)} do not match this evaluation's "
                             f"{tuple(images.shape)}: build the reference from the same EvalConfig")
        axis = 0 if domain == "style" else 1
        kept = [i for i, case in enumerate(cases) if case[axis] not in scores.removed]
        images_cpu = images.detach().float().cpu()
        scores.image_change = relative_image_change(images_cpu, reference.images, cases, kept)
        if reference.features is not None and feature_extractor is not None and len(kept) >= 2:
            features = extract_features(feature_extractor, images_cpu[kept])
            scores.frechet = frechet_distance(features, reference.features[kept])
    scores.images = images
    scores.seconds = round(time.perf_counter() - started, 3)
    scores.config = config.to_dict()
    return scores


# ----------------------------------------------------------------------------------------------- drift and cost
def _kv_change(pipe: Any, base_weights: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor],
                                                                              dict[str, torch.Tensor]]:
    if base_weights is None:
        if not isinstance(pipe, UnlearnMixin):
            raise TypeError("kv_drift needs an attached pipeline (du.attach) or explicit base_weights to compare with")
        state = unlearning_state(pipe)
        base = {k: w.detach().float().cpu() for k, w in state.base_weights.items()}
        deltas = state.composed_deltas()
        if deltas is None:
            return base, {k: torch.zeros_like(w) for k, w in base.items()}
        return base, {k: deltas[k].float().cpu() for k in base}
    denoiser = denoiser_of(pipe)
    if any(isinstance(m, ad.LoraLayer) for m in denoiser.modules()):
        raise ValueError("kv_drift with explicit base_weights needs plain K/V layers: fold() the pipeline first")
    current = {k: w.detach().float().cpu() for k, w in ad.kv_weights(denoiser).items()}
    missing = sorted(set(current) ^ set(base_weights))
    if missing:
        raise ValueError(f"base_weights do not match the pipeline's K/V layers: {missing[:4]}")
    base = {k: base_weights[k].detach().float().cpu() for k in current}
    return base, {k: current[k] - base[k] for k in current}


def kv_drift(pipe: Any, base_weights: dict[str, torch.Tensor] | None = None) -> float:
    """Relative Frobenius norm of the K/V change from the base: ||W - W_base||_F / ||W_base||_F over all K/V layers.

    For an attached pipeline the change is that of its active requests as composed (stacked, merged, folded);
    otherwise pass ``base_weights`` (layer name -> weight) of the model it came from.

    Args:
        pipe: an attached pipeline, or any pipeline when ``base_weights`` is given.
        base_weights: layer name -> base K/V weight (None: the attached pipeline's own base).

    Returns:
        The relative change, 0.0 for an unchanged model.

    Raises:
        TypeError: no ``base_weights`` and the pipeline is not attached.
        ValueError: ``base_weights`` do not match the K/V layers, or the pipeline has LoRA layers (fold it first).
    """
    base, change = _kv_change(pipe, base_weights)
    num = sum(float(d.square().sum()) for d in change.values())
    den = sum(float(w.square().sum()) for w in base.values())
    return (num / den) ** 0.5 if den else 0.0


def kv_drift_per_layer(pipe: Any, base_weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """``||dW||_F / ||W_base||_F`` per K/V layer.

    Args:
        pipe: an attached pipeline, or any pipeline when ``base_weights`` is given.
        base_weights: layer name -> base K/V weight (None: the attached pipeline's own base).

    Returns:
        Layer name -> relative change.

    Raises:
        TypeError: no ``base_weights`` and the pipeline is not attached.
        ValueError: as for ``kv_drift``.
    """
    base, change = _kv_change(pipe, base_weights)
    return {k: float(change[k].norm() / base[k].norm()) if float(base[k].norm()) else 0.0 for k in base}


def request_costs(pipe: Any) -> list[dict[str, Any]]:
    """Training cost of each active request, from the ledger: steps and seconds (setup + loop).

    Args:
        pipe: an attached pipeline.

    Returns:
        One dict per ledger request: request_id, concept, steps, seconds, setup_seconds, loop_seconds.
    """
    rows = []
    for record in pipe.unlearning_ledger.requests:
        rows.append({
            "request_id": record.request_id,
            "concept": record.concept,
            "steps": int(record.steps),
            "seconds": float(record.seconds),
            "setup_seconds": float(record.timing.get("setup_seconds", 0.0)),
            "loop_seconds": float(record.timing.get("loop_seconds", 0.0)),
        })
    return rows
