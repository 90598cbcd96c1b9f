"""An erasure check that looks at images: does a classifier still recognise the concept after the request?

The built-in check (``erasure_check.ErasureCheck``) measures how far the concept's noise prediction moved. It is
cheap and needs nothing but the model, but a prediction that moved is not an image that changed: on MiniCanvas it
called erased requests whose style stayed recognisable (docs/benchmarks/closed-form.md, "Verified by a
classifier"). Where a classifier for the domain exists (a bench world's, or ``du.CLIPZeroShotClassifier`` on a
real model), this check renders the concept with the model as it is after the request and asks the classifier.
Used with ``pipe.unlearn(..., erasure_check=ClassifierCheck(...), escalate=[...])``, a request it finds not erased
is solved again with stronger settings.

Render it on seeds that the evaluation does not use, so that the check cannot tune a request to the images it is
later scored on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._validation import check_int, check_number, check_seed
from ..images import generate_images
from ..prompts import same_concept

# images -> one label per image, as ``evaluation.Classifier`` (not imported: evaluation sits above the pipeline mixin)
Classifier = Callable[[Any], Sequence[str]]


@dataclass
class ClassifierCheck:
    """An erasure check by a classifier on rendered images: is the concept still recognised after the request?

    Pass it as ``pipe.unlearn(..., erasure_check=ClassifierCheck(...))``; with ``escalate=[...]`` a request it finds
    not erased is served again with stronger settings.

    Args:
        classifier: ``images -> labels``; it must answer with the concept's own name when it recognises it.
        templates: prompts with a ``{}`` slot for the concept, e.g. ``"A bear image in {} style."``.
        seeds: one image per template and seed. Keep them apart from the evaluation's seeds, so the check cannot
            tune a request to the images it is scored on.
        max_recognized: the request counts as erased when the classifier names the concept in at most this fraction
            of the images (0: in none).
        num_inference_steps: the pipeline's sampling steps for the check images.
        guidance_scale: the pipeline's guidance scale for the check images.
        batch_size: images per pipeline call.
        height: image height (None: the pipeline's default).
        width: image width (None: the pipeline's default).

    Raises:
        TypeError: ``classifier`` is not callable.
        ValueError: no templates, a template without exactly one ``{}`` slot, no seeds, or a number out of range.

    Examples:
        >>> check = ClassifierCheck(lambda images: ["monet"] * len(images), ["a cat in {} style"], seeds=[1, 2])
        >>> check.images_per_concept
        2
    """

    classifier: Classifier
    templates: Sequence[str]
    seeds: Sequence[int] = (0,)
    max_recognized: float = 0.1
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 32
    height: int | None = None
    width: int | None = None
    kind: str = field(default="classifier", init=False)

    def __post_init__(self) -> None:
        if not callable(self.classifier):
            raise TypeError(f"ClassifierCheck classifier must be callable (images -> labels), got {self.classifier!r}")
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(f"ClassifierCheck templates must be a non-empty list of prompts with a '{{}}' slot, "
                             f"got {self.templates!r}")
        for template in self.templates:
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(f"ClassifierCheck template needs exactly one '{{}}' slot, got {template!r}")
        self.templates = list(self.templates)
        if isinstance(self.seeds, (str, int)) or not self.seeds:
            raise ValueError(f"ClassifierCheck seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        self.seeds = [check_seed(s, "ClassifierCheck seeds") for s in self.seeds]
        check_number(self.max_recognized, "ClassifierCheck max_recognized", minimum=0, maximum=1)
        for name in ("num_inference_steps", "batch_size"):
            check_int(getattr(self, name), f"ClassifierCheck {name}", minimum=1)
        check_number(self.guidance_scale, "ClassifierCheck guidance_scale", minimum=0)

    @property
    def images_per_concept(self) -> int:
        """How many images one check renders: one per template and seed."""
        return len(self.templates) * len(self.seeds)

    def measure(self, pipe: Any, request_id: str, concept: str, prompts: Sequence[str], *, seed: int,
                guidance_scale: float, resolution: int | None) -> dict[str, Any]:
        """Render the concept with the model as it is after the request and count how often it is recognised.

        The request's own prompts, seed and sampling settings are not used: the check renders its own images (its
        templates and seeds), so that every request of a stream is judged on the same images.

        Args:
            pipe: the unlearning pipeline, with the request committed.
            request_id: the request being checked (part of the erasure-check interface; unused here).
            concept: the removed concept, put into each template.
            prompts: the request's prompts (part of the interface; unused here).
            seed: the request's seed (part of the interface; unused here).
            guidance_scale: the request's guidance (part of the interface; unused here).
            resolution: the request's resolution (part of the interface; unused here).

        Returns:
            The ``record.erasure`` figures: ``check``, ``recognized`` (fraction of images), ``max_recognized``,
            ``images``, ``erased`` and the ``probe`` used.

        Raises:
            ValueError: the classifier returned a label count that differs from the image count.
        """
        cases = [(t.format(concept), s) for s in self.seeds for t in self.templates]
        images = generate_images(pipe, [p for p, _ in cases], [s for _, s in cases],
                                 num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                 batch_size=self.batch_size, height=self.height, width=self.width, progress=False)
        labels = [str(label) for label in self.classifier(images)]
        if len(labels) != len(images):
            raise ValueError(f"classifier {self.classifier!r} returned {len(labels)} labels for {len(images)} images")
        recognized = sum(same_concept(label, concept) for label in labels) / len(labels)
        return {
            "check": self.kind,
            "recognized": round(recognized, 4),
            "max_recognized": self.max_recognized,
            "images": len(labels),
            "erased": bool(recognized <= self.max_recognized),
            "probe": {"templates": list(self.templates), "seeds": list(self.seeds),
                      "steps": self.num_inference_steps, "guidance_scale": self.guidance_scale},
        }

    @staticmethod
    def verdict(figures: dict[str, Any]) -> str:
        """One line for warnings and the model card.

        Args:
            figures: what :meth:`measure` returned (a record's ``erasure``).

        Returns:
            How often the concept was recognised and how often it was allowed to be.

        Examples:
            >>> ClassifierCheck.verdict({"recognized": 0.25, "images": 8, "max_recognized": 0.1})
            'recognised in 25% of 8 images, allowed 10%'
        """
        return (f"recognised in {100 * float(figures['recognized']):.0f}% of {figures['images']} images, "
                f"allowed {100 * float(figures['max_recognized']):g}%")
