"""How much of what nobody asked to remove survives: image change against the base, and a Fréchet distance.

Classifier accuracy (IRA / CRA) says whether a kept concept is still recognised; these say how far its images moved:

* ``relative_image_change``: the mean per-image distance between the unlearned model's images and the base model's at
  the same prompt and seed, divided by the mean distance between the base model's images of the same prompt at two
  different seeds (the "seed gap"). 0: untouched; 1: as different as another sample of the same prompt.
* ``frechet_distance``: the Fréchet distance between two sets of feature vectors (FID's formula), on whatever
  features a world supplies (MiniCanvas: its classifiers' pooled features; a real checkpoint: e.g. Inception or CLIP
  image features through the same hook).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] in [0, 1] -> features [B, F]


def _per_image_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel difference of each image pair, [B]."""
    return (a.float() - b.float()).flatten(1).square().mean(dim=1).sqrt()


def seed_gap(base_images: torch.Tensor, cases: Sequence[tuple[Any, ...]],
             rows: Sequence[int] | None = None) -> float | None:
    """Mean distance between the base model's images of the same prompt at different seeds (the first two seeds
    each prompt has among ``rows``); None when no prompt has two seeds: the scale a change is measured against.

    Args:
        base_images: the base model's images, one per case.
        cases: ``(style, object, seed)`` per image.
        rows: the images to use (default: every image).

    Returns:
        The mean distance, or None.
    """
    chosen = range(len(cases)) if rows is None else rows
    by_prompt: dict[tuple[Any, Any], list[int]] = {}
    for i in chosen:
        by_prompt.setdefault((cases[i][0], cases[i][1]), []).append(i)
    pairs = [(seeds[0], seeds[1]) for seeds in by_prompt.values() if len(seeds) >= 2]
    if not pairs:
        return None
    first = torch.stack([base_images[i] for i, _ in pairs])
    second = torch.stack([base_images[j] for _, j in pairs])
    return float(_per_image_distance(first, second).mean())


def relative_image_change(images: torch.Tensor, base_images: torch.Tensor, cases: Sequence[tuple[Any, ...]],
                          rows: Sequence[int] | None = None) -> float | None:
    """Mean distance of ``images`` to ``base_images`` (same prompt, same seed) over ``rows`` (default every image),
    divided by the base model's seed gap on the same rows; None when the gap is undefined (one seed) or zero.

    Args:
        images: the edited model's images, one per case.
        base_images: the base model's images of the same cases.
        cases: ``(style, object, seed)`` per image.
        rows: the images to compare (default: every image).

    Returns:
        The change in units of the seed gap, or None.

    Raises:
        ValueError: the two image sets differ in shape or do not have one image per case.
    """
    if images.shape != base_images.shape or len(images) != len(cases):
        raise ValueError(f"images {tuple(images.shape)} and base images {tuple(base_images.shape)} must have the same "
                         f"shape, one per case ({len(cases)} cases)")
    chosen = list(range(len(cases)) if rows is None else rows)
    if not chosen:
        return None
    gap = seed_gap(base_images, cases, chosen)
    if gap is None or gap <= 0:
        return None
    change = _per_image_distance(images[chosen], base_images[chosen]).mean()
    return float(change) / gap


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) between two feature sets [N, F] (float64; the
    covariances may be singular, as with fewer images than features: the symmetric form needs no inverse).

    Args:
        features: [N, F] features of one image set.
        reference: [M, F] features of the other.

    Returns:
        The distance, >= 0.

    Raises:
        ValueError: the sets are not [N, F] with the same F, have fewer than 2 rows, or are not finite.
    """
    if features.ndim != 2 or reference.ndim != 2 or features.shape[1] != reference.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with the same F, got {tuple(features.shape)} and "
                         f"{tuple(reference.shape)}")
    if len(features) < 2 or len(reference) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images per set, got {len(features)} and "
                         f"{len(reference)}")
    x, y = features.double(), reference.double()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("features must be finite")
    mu_x, mu_y = x.mean(dim=0), y.mean(dim=0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], x.shape[1]), torch.cov(y.T).reshape(y.shape[1], y.shape[1])
    root_x = _sqrt_psd(cov_x)
    cross = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp(min=0).sqrt().sum()
    value = float((mu_x - mu_y).square().sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * cross)
    return max(value, 0.0)  # rounding can take an identical pair a hair below zero


@dataclass
class EvalReference:
    """The base model's evaluation images (in ``EvalConfig.cases()`` order) and, with a feature extractor, their
    features: what ``evaluate_unlearning`` compares a later state with.

    Attributes:
        images: the base model's images, float32 on the CPU.
        features: their features [N, F] (None: no feature extractor was given).
    """

    images: torch.Tensor
    features: torch.Tensor | None = None

    @classmethod
    def from_images(cls, images: torch.Tensor, feature_extractor: FeatureExtractor | None = None) -> EvalReference:
        """A reference from the base model's images, with their features when an extractor is given.

        Args:
            images: the base model's evaluation images, in ``EvalConfig.cases()`` order.
            feature_extractor: a callable from images to [B, F] features (None: images only).

        Returns:
            The reference (images copied to float32 on the CPU).

        Raises:
            ValueError: the extractor does not return one feature row per image.
        """
        images = images.detach().float().cpu()
        features = None if feature_extractor is None else extract_features(feature_extractor, images)
        return cls(images, features)


def extract_features(feature_extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    """``feature_extractor(images)`` checked to be one finite feature row per image."""
    features = torch.as_tensor(feature_extractor(images)).detach().float().cpu()
    if features.ndim != 2 or len(features) != len(images):
        raise ValueError(f"feature extractor {feature_extractor!r} must return [B, F] features for {len(images)} "
                         f"images, got shape {tuple(features.shape)}")
    return features
