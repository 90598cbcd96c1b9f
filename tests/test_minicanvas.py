"""MiniCanvas: the synthetic image set, the shipped model and classifiers, weight verification, training smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_unlearn import minicanvas as mc
from diffusers_unlearn.minicanvas import weights as mc_weights

HELD_OUT_SEED = 7_000_000  # far from the training (0..) and validation (1_000_000..) render seeds


@pytest.fixture(scope="module")
def pipe():
    p = mc.load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def classifiers():
    return mc.load_classifiers()


@pytest.fixture()
def weights_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "weights"
    shutil.copytree(mc_weights.DEFAULT_WEIGHTS_DIR, dst)
    return dst


# --------------------------------------------------------------------------------------------------- data


def test_vocabulary_of_concepts_and_families():
    assert len(mc.STYLES) >= 12 and len(set(mc.STYLES)) == len(mc.STYLES)
    assert len(mc.OBJECTS) >= 6 and len(set(mc.OBJECTS)) == len(mc.OBJECTS)
    assert sorted(s for members in mc.STYLE_FAMILIES.values() for s in members) == sorted(mc.STYLES)
    big_families = [f for f, members in mc.STYLE_FAMILIES.items() if len(members) >= 3]
    assert len(big_families) >= 3
    for family, members in mc.STYLE_FAMILIES.items():
        assert all(s.split()[0] == family for s in members)  # neighbours share a word
    # Some texture words are shared across families too ("neon dots" / "pastel dots").
    last_words = [s.split()[-1] for s in mc.STYLES]
    assert len(set(last_words)) < len(last_words)
    assert mc.PROMPT_TEMPLATE == "a {object} in {style} style"
    assert mc.prompt("neon dots", "cat") == "a cat in neon dots style"
    with pytest.raises(ValueError, match="unknown style"):
        mc.prompt("van gogh", "cat")


def test_render_is_deterministic_and_seed_dependent():
    a = np.asarray(mc.render("neon waves", "fish", 3))
    b = np.asarray(mc.render("neon waves", "fish", 3))
    c = np.asarray(mc.render("neon waves", "fish", 4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5  # jitter of position, scale, rotation, texture
    assert mc.render("ink sketch", "tree", 0, size=64).size == (64, 64)


def test_styles_separable_by_colour_and_objects_by_shape():
    # Style: even a nearest centroid on coarse colour histograms of whole renders (background included) names the
    # style far above chance (1/12); the trained classifier (below) does much better.
    def hist(img) -> np.ndarray:
        q = np.asarray(img).reshape(-1, 3) // 64
        return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / q.shape[0]

    train = {s: np.mean([hist(mc.render(s, o, k)) for o in mc.OBJECTS for k in range(2)], 0) for s in mc.STYLES}
    centroids = np.stack([train[s] for s in mc.STYLES])
    hits = [mc.STYLES[int(np.argmin(((centroids - hist(mc.render(s, o, HELD_OUT_SEED))) ** 2).sum(1)))] == s
            for s in mc.STYLES for o in mc.OBJECTS]
    assert np.mean(hits) >= 0.75
    # Object: the silhouettes differ (same style and seed, different object -> clearly different images).
    imgs = {o: np.asarray(mc.render("ink sketch", o, 5)).astype(float) for o in mc.OBJECTS}
    for i, o1 in enumerate(mc.OBJECTS):
        for o2 in mc.OBJECTS[i + 1:]:
            assert np.abs(imgs[o1] - imgs[o2]).mean() > 5, (o1, o2)


# --------------------------------------------------------------------------------------------------- shipped


def test_shipped_weights_are_small_verified_and_good():
    manifest = mc.verify_weights()
    assert mc_weights.weights_size() <= 25 * 1024 * 1024
    assert set(mc_weights.REQUIRED_FILES) <= set(manifest["files"])
    quality = manifest["quality"]  # measured by `python -m diffusers_unlearn.minicanvas.quality --record`
    assert quality["style_accuracy"] >= 0.9 and quality["object_accuracy"] >= 0.9
    assert quality["num_images"] == len(mc.STYLES) * len(mc.OBJECTS) * len(mc.EVAL_SEEDS)


def test_load_pipeline_generates_images_of_the_right_size(pipe):
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("attn2.to_v") for n in names)
    for word in {w for s in mc.STYLES for w in s.split()} | set(mc.OBJECTS):
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    out = pipe(["a cat in neon dots style", ""], num_inference_steps=3, guidance_scale=mc.GUIDANCE_SCALE,
               generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pil")
    assert [im.size for im in out.images] == [(mc.RESOLUTION, mc.RESOLUTION)] * 2


def test_standard_folder_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(mc_weights.DEFAULT_WEIGHTS_DIR / "pipeline", safety_checker=None,
                                                requires_safety_checker=False, local_files_only=True)
    assert p.unet.config.sample_size * p.vae_scale_factor == mc.RESOLUTION


def test_classifiers_well_above_chance_on_fresh_renders(classifiers):
    style_clf, object_clf = classifiers
    pairs = [(s, o) for s in mc.STYLES for o in mc.OBJECTS]
    images = [mc.render(s, o, HELD_OUT_SEED + i) for i, (s, o) in enumerate(pairs)]
    style_acc = np.mean([p == s for p, (s, _) in zip(style_clf(images), pairs)])
    object_acc = np.mean([p == o for p, (_, o) in zip(object_clf(images), pairs)])
    assert style_acc >= 0.9 and object_acc >= 0.9  # chance: 1/12 and 1/6
    # A float tensor batch in [0, 1] gives the same answers as the PIL images.
    tensor = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    assert style_clf(tensor) == style_clf(images)
    assert object_clf(tensor) == object_clf(images)


def test_base_model_images_are_recognised(pipe, classifiers):
    # One image per style, objects in turn, at the recommended settings: the classifiers read both concepts.
    style_clf, object_clf = classifiers
    pairs = [(s, mc.OBJECTS[i % len(mc.OBJECTS)]) for i, s in enumerate(mc.STYLES)]
    out = pipe([mc.prompt(s, o) for s, o in pairs], num_inference_steps=mc.NUM_INFERENCE_STEPS,
               guidance_scale=mc.GUIDANCE_SCALE,
               generator=[torch.Generator().manual_seed(mc.EVAL_SEEDS[0]) for _ in pairs], output_type="pt")
    style_hits = sum(p == s for p, (s, _) in zip(style_clf(out.images), pairs))
    object_hits = sum(p == o for p, (_, o) in zip(object_clf(out.images), pairs))
    assert style_hits >= 0.75 * len(pairs) and object_hits >= 0.75 * len(pairs)


# --------------------------------------------------------------------------------------------------- corruption


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):  # inside the tensor data, past the header
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("rel", ["pipeline/unet/diffusion_pytorch_model.safetensors", "classifiers/style.safetensors"])
def test_corrupted_weight_file_is_named(weights_copy: Path, rel: str):
    target = weights_copy / rel
    _flip_bytes(target)
    with pytest.raises(mc.MiniCanvasWeightsError, match="checksum") as info:
        mc.load_pipeline(weights_dir=weights_copy)
    assert str(target) in str(info.value)
    with pytest.raises(ValueError) as info:
        mc.load_classifiers(weights_dir=weights_copy)
    assert str(target) in str(info.value)


def test_missing_weight_file_is_named(weights_copy: Path):
    target = weights_copy / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    target.unlink()
    with pytest.raises(mc.MiniCanvasWeightsError, match="missing") as info:
        mc.load_pipeline(weights_dir=weights_copy)
    assert str(target) in str(info.value)


def _rehash(weights_dir: Path, rel: str) -> None:
    """Make the manifest agree with a changed file, so that only the shape check can catch it."""
    manifest_path = weights_dir / mc_weights.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    path = weights_dir / rel
    manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": mc_weights._sha256(path)}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("rel", ["pipeline/unet/diffusion_pytorch_model.safetensors", "classifiers/object.safetensors"])
def test_wrong_shapes_are_named(weights_copy: Path, rel: str):
    target = weights_copy / rel
    state = load_file(str(target))
    name = sorted(k for k, v in state.items() if v.ndim >= 2)[0]
    state[name] = torch.zeros(*[d + 1 for d in state[name].shape])
    save_file(state, str(target))
    _rehash(weights_copy, rel)
    loader = mc.load_pipeline if rel.startswith("pipeline") else mc.load_classifiers
    with pytest.raises(mc.MiniCanvasWeightsError) as info:
        loader(weights_dir=weights_copy)
    assert str(target) in str(info.value)


# --------------------------------------------------------------------------------------------------- training


def test_quick_training_run_is_deterministic_and_loadable(tmp_path: Path):
    from diffusers_unlearn.minicanvas import train as mc_train

    out = tmp_path / "quick"
    report = mc_train.train(mc_train.QUICK, out)
    assert report["config"]["unet_steps"] == mc_train.QUICK.unet_steps
    manifest = mc.verify_weights(out)
    assert set(mc_weights.REQUIRED_FILES) <= set(manifest["files"])
    again = mc_train.train(mc_train.QUICK, tmp_path / "again")
    assert again["config"] == report["config"]
    assert mc.verify_weights(tmp_path / "again")["files"] == manifest["files"]  # same seed -> same bytes
    p = mc.load_pipeline(weights_dir=out)
    p.set_progress_bar_config(disable=True)
    images = p(["a fish in ink wash style"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, mc_train.QUICK.resolution, mc_train.QUICK.resolution)
    style_clf, object_clf = mc.load_classifiers(weights_dir=out)
    assert style_clf(images)[0] in mc.STYLES and object_clf(images)[0] in mc.OBJECTS
