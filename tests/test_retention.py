"""evaluation/retention.py and the retention fields of evaluate_unlearning: an untouched image scores at the base's
level, a destroyed one far from it; exact invariants of the Fréchet distance."""

from __future__ import annotations

import pytest
import torch

import diffusers_unlearn as du
from diffusers_unlearn import evaluation as ev
from diffusers_unlearn.minicanvas.classifier import images_to_tensor

mc = du.minicanvas
STYLES = ["neon waves", "pastel dots", "ink wash"]
OBJECTS = ["bear", "fish", "house"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def classifiers():
    return mc.load_classifiers()


@pytest.fixture(scope="module")
def renders():
    """Ground-truth MiniCanvas renders of every case, in EvalConfig.cases() order: the 'base model' images."""
    config = ev.EvalConfig(styles=STYLES, objects=OBJECTS, template=mc.PROMPT_TEMPLATE, seeds=SEEDS)
    cases = config.cases()
    images = images_to_tensor([mc.render(s, o, seed) for s, o, seed in cases], 32)
    return config, cases, images


def destroyed(images: torch.Tensor) -> torch.Tensor:
    """What an erasure that destroys its prompt draws: one flat blue pattern with no object."""
    pattern = torch.zeros_like(images)
    pattern[:, 2] = 0.8
    pattern[:, :, ::4] = 0.3
    return pattern


def test_image_change_is_zero_untouched_and_above_a_seed_gap_when_destroyed(renders):
    _, cases, images = renders
    assert ev.relative_image_change(images, images, cases) == 0.0
    # a new sample of every prompt (the other seed) is one seed gap away, by definition
    swapped = images.clone()
    half = len(cases) // 2
    swapped[:half], swapped[half:] = images[half:], images[:half]
    assert ev.relative_image_change(swapped, images, cases) == pytest.approx(1.0, rel=1e-5)
    assert ev.relative_image_change(destroyed(images), images, cases) > 1.5
    # one seed: no gap to compare with
    assert ev.relative_image_change(images[:half], images[:half], cases[:half]) is None
    with pytest.raises(ValueError, match="same shape"):
        ev.relative_image_change(images[:2], images, cases)


def test_frechet_distance_invariants():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    assert ev.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    # a pure shift leaves both covariances equal: the distance is exactly ||shift||^2 (up to float64 rounding)
    assert ev.frechet_distance(x + shift, x) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # fewer images than features (singular covariances) still gives a finite, symmetric value
    y = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    assert ev.frechet_distance(x, y) == pytest.approx(ev.frechet_distance(y, x), rel=1e-6)
    for bad in (torch.ones(1, 6), torch.full((4, 6), float("nan"))):
        with pytest.raises(ValueError):
            ev.frechet_distance(bad, x.float())


def test_evaluation_scores_the_kept_images_against_the_base(renders, classifiers):
    config, cases, images = renders
    style_clf, object_clf = classifiers
    features = du.bench.world.minicanvas_features(style_clf, object_clf)
    reference = ev.EvalReference.from_images(images, features)
    removed = [STYLES[0]]
    same = ev.evaluate_unlearning(None, removed, "style", style_clf, object_clf, config, images=images,
                                  reference=reference, feature_extractor=features)
    assert same.image_change == 0.0 and same.frechet == pytest.approx(0.0, abs=1e-6)
    # the objects in the removed style's own prompts are drawn: the base renders keep them
    assert same.cross_removed >= 80.0
    # destroy every image of the removed style and of one kept style
    broken = images.clone()
    rows = [i for i, (s, _, _) in enumerate(cases) if s in (STYLES[0], STYLES[1])]
    broken[rows] = destroyed(images[rows])
    scores = ev.evaluate_unlearning(None, removed, "style", style_clf, object_clf, config, images=broken,
                                    reference=reference, feature_extractor=features)
    assert scores.cross_removed <= 50.0 < same.cross_removed
    assert scores.image_change > 0.5 and scores.frechet > 10 * max(same.frechet, 1e-3)
    assert "images" not in scores.to_dict() and scores.to_dict()["cross_removed"] == scores.cross_removed
    with pytest.raises(ValueError, match="reference images"):
        ev.evaluate_unlearning(None, removed, "style", style_clf, object_clf, config, images=broken,
                               reference=ev.EvalReference(images[:3]))
