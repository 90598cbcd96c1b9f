"""Classifiers for evaluation: any callable from images to label names.

A classifier is ``classifier(images) -> list[str]`` where ``images`` is a float tensor ``[B, 3, H, W]`` in [0, 1]
(what :func:`~diffusers_unlearn.evaluation.generate_images` returns) or a list of PIL images. The MiniCanvas
classifiers have that form; :class:`CLIPZeroShotClassifier` gives it to a local transformers CLIP checkpoint for
real models (UnlearnCanvas itself uses fine-tuned ViT-Large classifiers; zero-shot CLIP is the no-training stand-in).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPModel, CLIPProcessor

from .._validation import check_int
from ..images import Images, to_pil
from ..worlds import get_world

Classifier = Callable[[Images], Sequence[str]]

DEFAULT_CLIP_TEMPLATES: tuple[str, ...] = ("a {} image", "an image in {} style", "a picture of a {}")


def classify(classifier: Classifier, images: Images, labels: Sequence[str] | None = None) -> list[str]:
    """Call ``classifier`` and check that it answers one label per image (from ``labels`` when given).

    Args:
        classifier: a callable from images to one label each.
        images: the images to classify.
        labels: the labels it may answer (None: any).

    Returns:
        One label per image.

    Raises:
        ValueError: the classifier answered another number of labels, or a label outside ``labels``.
    """
    count = len(images)
    predictions = list(classifier(images))
    if len(predictions) != count:
        raise ValueError(f"classifier {classifier!r} returned {len(predictions)} labels for {count} images")
    if labels is not None:
        allowed = set(labels)
        unknown = sorted({str(p) for p in predictions if p not in allowed})
        if unknown:
            raise ValueError(f"classifier {classifier!r} returned labels {unknown[:5]} outside its label set "
                             f"{sorted(allowed)[:20]}")
    return [str(p) for p in predictions]


class CLIPZeroShotClassifier:
    """Zero-shot classification with a local transformers CLIP checkpoint (never downloads).

    Each label's text embedding is the normalised mean of the CLIP text embeddings of ``templates`` filled with
    the label (prompt ensembling); an image gets the label of highest cosine similarity.

    Args:
        model_path: a local folder holding a ``CLIPModel`` and its processor (``save_pretrained`` layout).
        labels: the label names, e.g. the style names.
        templates: prompts with one ``{}`` slot for the label.
        device: where to run (default: CPU).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        labels: Sequence[str],
        templates: Sequence[str] = DEFAULT_CLIP_TEMPLATES,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP checkpoint folder not found: {path} (a local folder with a CLIPModel and "
                                    f"its processor, as save_pretrained writes them; nothing is downloaded)")
        labels = [str(label) for label in labels]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be a non-empty list of distinct names, got {labels!r}")
        if isinstance(templates, str) or not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"templates must be a list of strings with one '{{}}' slot each, got {templates!r}")
        check_int(batch_size, "batch_size", minimum=1)
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a CLIP model and processor from {path}: {err}") from err
        self.model.to(device or "cpu")
        self.labels = labels
        self.templates = tuple(templates)
        self.batch_size = batch_size
        self.model_path = str(path)
        self.text_features = self._label_features()

    @property
    def device(self) -> torch.device:
        """Where the CLIP model runs."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _label_features(self) -> torch.Tensor:
        # text_model + text_projection directly: get_text_features' return type changed across transformers versions
        prompts = [t.format(label) for label in self.labels for t in self.templates]
        tokens = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(**tokens).pooler_output
        features = torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)
        features = features.view(len(self.labels), len(self.templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def image_features(self, images: Images) -> torch.Tensor:
        """Normalised CLIP image embeddings ``[B, d]``.

        Args:
            images: a batch of images (PIL images, or a float tensor [B, 3, H, W] in [0, 1]).

        Returns:
            The embeddings, float32, on the model's device.
        """
        pil = to_pil(images)
        out = []
        for start in range(0, len(pil), self.batch_size):
            inputs = self.processor(images=pil[start : start + self.batch_size], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.text_features.shape[1])

    def logits(self, images: Images) -> torch.Tensor:
        """Cosine similarity of every image with every label ``[B, len(labels)]``.

        Args:
            images: a batch of images (PIL images, or a float tensor [B, 3, H, W] in [0, 1]).

        Returns:
            The similarities, one row per image.
        """
        return self.image_features(images) @ self.text_features.T

    def __call__(self, images: Images) -> list[str]:
        """The label of highest similarity for each image.

        Args:
            images: a batch of images (PIL images, or a float tensor [B, 3, H, W] in [0, 1]).

        Returns:
            One label per image.
        """
        return [self.labels[i] for i in self.logits(images).argmax(dim=1).tolist()]

    def __repr__(self) -> str:
        return f"CLIPZeroShotClassifier({self.model_path!r}, labels={len(self.labels)})"


def minicanvas_classifiers(weights_dir: str | os.PathLike | None = None,
                           device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Deprecated (kept one release): ``du.minicanvas.load_classifiers(device=..., weights_dir=...)``.

    Args:
        weights_dir: the MiniCanvas weights folder (default: the shipped one).
        device: where to run them (default: the CPU).

    Returns:
        The shipped MiniCanvas ``(style_classifier, object_classifier)``, checked against their manifest.
    """
    warnings.warn("minicanvas_classifiers() is deprecated: use du.minicanvas.load_classifiers() or "
                  "du.minicanvas.eval_world().load_classifiers() (evaluation takes a world; it knows none of its own)",
                  FutureWarning, stacklevel=2)
    return get_world("minicanvas").evaluation_world().load_classifiers(device=device, weights_dir=weights_dir)
