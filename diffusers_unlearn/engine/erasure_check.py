"""The erasure check every request ends with: did the concept's prediction actually move?

On a few short DDIM trajectories of the request's own prompts, sampled (with the request's seed) on the model as it
was before the request, compare noise predictions before and after:

* ``target_shift`` = ||eps'(x, c) - eps(x, c)|| / ||eps(x, c) - eps(x, c without the concept)||: how far the
  concept's prediction moved, relative to the concept's own part of it (the prompt with the concept removed is the
  reference, so a style's signal is measured apart from its object's);
* ``reference_shift``: the same for that prompt without the concept, against the empty prompt: how much the
  rest of the prompt moved.

A request erased when ``target_shift >= min_shift``. The figures go into the request's ledger record
(``record.erasure``) and the model card. Cost: ``steps`` UNet passes (with guidance) per probe prompt plus a few
probe predictions, on top of which the model is switched twice (``audit``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_count, check_number
from .classifier_check import ClassifierCheck
from ..families.conditioning import Conditioning, sample_trajectory
from ..families.registry import conditioner_for, denoiser_of
from ..objectives.base import prompts_by_concept

MIN_SHIFT = 0.5


class ErasureError(RuntimeError):
    """A request that did not move its concept enough, with ``require_erasure=True``; nothing was committed.

    Args:
        message: what was not erased and what to try instead.
        figures: the check's figures (what ``record.erasure`` would have held), kept as ``self.figures`` so that a
            caller can read how far the concept moved.
    """

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = dict(figures or {})


class ErasureWarning(UserWarning):
    """A request committed although its concept barely moved (recorded in the ledger as not erased)."""


@dataclass
class ErasureCheck:
    """The built-in erasure check: how far the concept's noise prediction moved, as a fraction of its own signal.

    Cheap (a few short trajectories, no images decoded) and needs nothing but the model; a prediction that moved is
    not always an image that changed, so where a classifier exists prefer ``ClassifierCheck``.

    Args:
        prompts: how many of the request's prompts to probe (the first ones).
        steps: DDIM steps of each probe trajectory.
        probe_points: trajectory steps where the predictions are compared (spread over the trajectory).
        min_shift: the concept counts as erased when its prediction moved at least this fraction of its own signal.

    Raises:
        ValueError: a count that is not an integer >= 1, or a ``min_shift`` that is not a finite number > 0.
    """

    prompts: int = 2
    steps: int = 10
    probe_points: int = 3
    min_shift: float = MIN_SHIFT

    def __post_init__(self) -> None:
        for name in ("prompts", "steps", "probe_points"):
            check_count(getattr(self, name), f"erasure check {name}")
        check_number(self.min_shift, "erasure check min_shift", minimum=0, exclusive_minimum=True)

    def measure(self, pipe: Any, request_id: str, concept: str, prompts: list[str], *, seed: int,
                guidance_scale: float, resolution: int | None) -> dict[str, Any]:
        """Measure how far a committed request moved its concept's prediction.

        Args:
            pipe: the unlearning pipeline that holds the request.
            request_id: the committed request to measure (compared with the model without it).
            concept: the removed concept, cut out of each prompt to get its reference prompt.
            prompts: the request's own prompts; the first ``self.prompts`` are probed.
            seed: seed of the probe trajectories (the request's, so the check is reproducible).
            guidance_scale: classifier-free guidance of the probe trajectories.
            resolution: image side of the probes (None: the pipeline's default).

        Returns:
            The ``record.erasure`` figures: ``target_shift``, ``reference_shift``, ``min_shift``, ``erased`` and
            the ``probe`` that was used.
        """
        return check_erasure(pipe, request_id, concept, prompts, seed=seed, guidance_scale=guidance_scale,
                             resolution=resolution, check=self)

    def measure_concepts(self, pipe: Any, request_id: str, groups: dict[str, list[str]], *, seed: int,
                         guidance_scale: float, resolution: int | None) -> dict[str, dict[str, Any]]:
        """:meth:`measure` for each concept of a request of several, every probe in one batch of trajectories
        (the model switched once, not once per concept).

        Args:
            pipe: the unlearning pipeline that holds the request.
            request_id: the committed request to measure.
            groups: each concept and the request's prompts that name it (the first ``self.prompts`` are probed).
            seed: seed of the probe trajectories.
            guidance_scale: classifier-free guidance of the probe trajectories.
            resolution: image side of the probes (None: the pipeline's default).

        Returns:
            Each concept's figures, as :meth:`measure` returns them.
        """
        return check_erasure_concepts(pipe, request_id, groups, seed=seed, guidance_scale=guidance_scale,
                                      resolution=resolution, check=self)

    @staticmethod
    def verdict(figures: dict[str, Any]) -> str:
        """One line for warnings and the model card.

        Args:
            figures: what :meth:`measure` returned (a record's ``erasure``).

        Returns:
            How far the prediction moved and how far it had to move.

        Examples:
            >>> ErasureCheck.verdict({"target_shift": 0.31, "min_shift": 0.5})
            "its prediction shifted by 0.31 of the concept's own signal, erased needs >= 0.5"
        """
        return (f"its prediction shifted by {float(figures['target_shift']):.2f} of the concept's own signal, "
                f"erased needs >= {float(figures['min_shift']):g}")


def _without(prompt: str, concept: str) -> str:
    start = prompt.lower().find(concept.lower())
    if start < 0:
        return ""
    return " ".join((prompt[:start] + prompt[start + len(concept):]).split())


def check_erasure(pipe: Any, request_id: str, concept: str, prompts: list[str], *, seed: int,
                  guidance_scale: float = 3.0, resolution: int | None = None,
                  check: ErasureCheck | None = None) -> dict[str, Any]:
    """Measure request ``request_id`` of ``pipe`` (already committed); returns the record's ``erasure`` figures."""
    return check_erasure_concepts(pipe, request_id, {concept: prompts}, seed=seed, guidance_scale=guidance_scale,
                                  resolution=resolution, check=check)[concept]


@torch.no_grad()
def check_erasure_concepts(pipe: Any, request_id: str, groups: dict[str, list[str]], *, seed: int,
                           guidance_scale: float = 3.0, resolution: int | None = None,
                           check: ErasureCheck | None = None) -> dict[str, dict[str, Any]]:
    """``check_erasure`` of each concept of ``groups`` (concept -> its prompts), all probes in one batch of
    trajectories under one switch of the model; returns each concept's figures."""
    check = check or ErasureCheck()
    conditioner = conditioner_for(pipe)  # the UNet's or the transformer's own parametrisation
    denoiser = denoiser_of(pipe)
    probes: list[str] = []
    owners: list[str] = []
    for concept, prompts in groups.items():
        chosen = list(prompts[: check.prompts])
        probes += chosen
        owners += [concept] * len(chosen)
    references = [_without(p, c) for p, c in zip(probes, owners)]
    n = len(probes)
    cond = conditioner.encode(probes)
    reference = conditioner.encode(references)
    uncond = conditioner.encode_unconditional(n)
    generator = torch.Generator().manual_seed(seed)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = Conditioning.cat([cond, reference, uncond])
        return conditioner.predict(denoiser, torch.cat([x] * 3), torch.cat([t] * 3), both).float()

    with pipe.audit(request_id, mode="without"):
        latents, timesteps = sample_trajectory(conditioner, denoiser, cond, uncond, steps=check.steps,
                                               guidance_scale=guidance_scale, generator=generator,
                                               resolution=resolution)
        points = torch.linspace(0, len(timesteps) - 1, check.probe_points + 2).round().long()[1:-1].unique()
        x = latents[points].flatten(0, 1)
        t = timesteps[points].repeat_interleave(n)
        cond, reference, uncond = (c.select(torch.arange(n).repeat(len(points))) for c in (cond, reference, uncond))
        before = predict(x, t)
    after = predict(x, t)
    b_target, b_ref, b_uncond = before.chunk(3)
    a_target, a_ref, _ = after.chunk(3)
    tiny = torch.finfo(torch.float32).tiny
    out = {}
    for concept in groups:
        # rows are (probe point, prompt); one concept takes them all, several each take their own prompts' rows
        rows = slice(None) if len(groups) == 1 else \
            torch.tensor([o == concept for o in owners]).repeat(len(points))
        target_shift = float((a_target[rows] - b_target[rows]).norm()
                             / (b_target[rows] - b_ref[rows]).norm().clamp(min=tiny))
        reference_shift = float((a_ref[rows] - b_ref[rows]).norm()
                                / (b_ref[rows] - b_uncond[rows]).norm().clamp(min=tiny))
        out[concept] = {
            "target_shift": round(target_shift, 4),
            "reference_shift": round(reference_shift, 4),
            "min_shift": check.min_shift,
            "erased": bool(target_shift >= check.min_shift),
            "probe": {"prompts": [p for p, o in zip(probes, owners) if o == concept], "steps": check.steps,
                      "points": points.tolist(), "seed": seed},
        }
    return out


def measure_erasure(check: Any, pipe: Any, request_id: str, request: Any) -> dict[str, Any]:
    """The erasure figures of a committed request, with ``check`` (an ``ErasureCheck``, a ``ClassifierCheck`` or an
    object like them): one measurement for one concept; for a request of several, one per concept on the prompts
    that name it (in one batch where the check has ``measure_concepts``), combined so that the request counts as
    erased only when every concept is.

    Args:
        check: the erasure check (its ``measure(pipe, request_id, concept, prompts, seed=, guidance_scale=,
            resolution=)``).
        pipe: the unlearning pipeline that holds the request.
        request_id: the committed request.
        request: its ``UnlearnRequest`` (concepts, prompts, seed and method settings).

    Returns:
        ``check``'s figures for one concept. For several: the least erased concept's figures (not erased first,
        then the smallest shift or the most often recognised), ``erased`` true only when every concept's is,
        ``worst`` naming that concept and ``concepts`` mapping each concept to its own figures (without the probe).
    """
    options = dict(seed=request.seed, guidance_scale=request.method.guidance_scale,
                   resolution=request.method.resolution)
    concepts = tuple(request.concepts)
    if len(concepts) == 1:
        return check.measure(pipe, request_id, request.concept, request.prompts, **options)
    groups = prompts_by_concept(request.prompts, concepts)
    batched = getattr(check, "measure_concepts", None)
    per = batched(pipe, request_id, groups, **options) if callable(batched) else \
        {c: check.measure(pipe, request_id, c, groups[c], **options) for c in concepts}

    def weakness(concept: str) -> tuple[bool, float]:
        figures = per[concept]
        if "target_shift" in figures:
            return bool(figures.get("erased", True)), float(figures["target_shift"])
        return bool(figures.get("erased", True)), -float(figures.get("recognized", 0.0))

    worst = min(concepts, key=weakness)
    return {**per[worst], "erased": all(bool(f.get("erased", True)) for f in per.values()), "worst": worst,
            "concepts": {c: {k: v for k, v in f.items() if k != "probe"} for c, f in per.items()}}


def verdict(figures: dict[str, Any]) -> str:
    """The check's one-line reading of ``figures`` (a record's ``erasure``: the shift check's, or a
    ``ClassifierCheck``'s, told apart by their ``check`` entry)."""
    if figures.get("check") == "classifier":
        return ClassifierCheck.verdict(figures)
    return ErasureCheck.verdict(figures)


def report_erasure(concept: str, figures: dict[str, Any], require: bool, method: str | None = None) -> None:
    """Warn (or raise ``ErasureError`` when ``require``) about a request whose concept did not move enough;
    ``method`` (the request's) picks the advice."""
    if figures.get("erased", True):
        return
    if method == "closed_form":
        advice = ("Use a larger negative_guidance or concept_weight, or keep fewer concepts (vocabulary=, keep=, "
                  "max_kept_fraction=)")
    else:
        advice = "Use more steps, a larger learning rate or fewer protected concepts"
    tried = len(figures.get("attempts") or [])
    escalated = f" (after {tried} weaker attempt(s), undone)" if tried else ""
    per = figures.get("concepts")
    if isinstance(per, dict):  # a request of several concepts: name those that stayed, and the weakest's figures
        stayed = [c for c, f in per.items() if not f.get("erased", True)]
        message = (f"the request removing {concept!r} did not erase {stayed}{escalated}: "
                   f"{figures.get('worst')!r}: {verdict(figures)}. " + advice)
    else:
        message = f"the request removing {concept!r} did not erase it{escalated}: {verdict(figures)}. " + advice
    if require:
        raise ErasureError(message + "; nothing was committed (require_erasure=True)", figures)
    warnings.warn(message + "; it is recorded in the ledger as not erased", ErasureWarning, stacklevel=4)
