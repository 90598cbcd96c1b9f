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
from diffusers_unlearn.minicanvas import checkpoint as mc_weights

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
    assert len(mc.STYLES) >= 48 and len(set(mc.STYLES)) == len(mc.STYLES)
    assert len(mc.OBJECTS) >= 12 and len(set(mc.OBJECTS)) == len(mc.OBJECTS)
    assert sorted(s for members in mc.STYLE_FAMILIES.values() for s in members) == sorted(mc.STYLES)
    assert len(mc.STYLE_FAMILIES) >= 12 and all(len(m) >= 4 for m in mc.STYLE_FAMILIES.values())
    for family, members in mc.STYLE_FAMILIES.items():
        assert all(s.split()[0] == family for s in members)  # neighbours share a word
    # Texture words are shared across families too ("neon dots" / "pastel dots"): every family has a neighbour in
    # at least one other family.
    families_of_texture: dict[str, set[str]] = {}
    for s in mc.STYLES:
        families_of_texture.setdefault(s.split()[-1], set()).add(s.split()[0])
    for family, members in mc.STYLE_FAMILIES.items():
        assert any(len(families_of_texture[s.split()[-1]]) > 1 for s in members), family
    assert mc.PROMPT_TEMPLATE == "a {object} in {style} style" == mc.TRAINING_TEMPLATES[0]
    assert mc.prompt("neon dots", "cat") == "a cat in neon dots style"
    with pytest.raises(ValueError, match="unknown style"):
        mc.prompt("van gogh", "cat")
    with pytest.raises(ValueError, match="unknown object"):
        mc.prompt("neon dots", "dog")


def test_heldout_templates_are_never_trained_on():
    from diffusers_unlearn.minicanvas import train as mc_train

    assert len(mc.HELDOUT_TEMPLATES) >= 4 and not set(mc.HELDOUT_TEMPLATES) & set(mc.TRAINING_TEMPLATES)
    assert mc.prompt("neon dots", "cat", mc.HELDOUT_TEMPLATES[1]) == "a neon dots-style cat"
    # No prompt the training run conditions on is a held-out wording of any pair.
    _, trained = mc_train._prompt_table(mc_train.build_tokenizer(mc_train.QUICK), mc_train.QUICK)
    heldout = {mc.prompt(s, o, t) for s in mc.STYLES for o in mc.OBJECTS for t in mc.HELDOUT_TEMPLATES}
    assert not heldout & set(trained)
    assert {mc.prompt(s, o, t) for s in mc.STYLES[:2] for o in mc.OBJECTS[:2] for t in mc.TRAINING_TEMPLATES} \
        <= set(trained)
    for bad in ("a {object}", "{style} {thing} {object}", 3):
        with pytest.raises(ValueError, match="template"):
            mc.prompt("neon dots", "cat", bad)


def test_tokenizer_makes_every_prompt_word_one_token():
    from diffusers_unlearn.minicanvas import train as mc_train

    tokenizer = mc_train.build_tokenizer(mc_train.FULL)
    for word in mc.data.VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer(mc.prompt("neon dots", "cat", mc.HELDOUT_TEMPLATES[1]), add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["a</w>", "neon</w>", "dots</w>", "-</w>", "style</w>", "cat</w>"]


def test_auxiliary_concepts_come_from_the_vocabulary_and_exclude_the_target():
    pool = mc.auxiliary_concepts(exclude=["neon dots"])
    assert sum(len(v) for v in pool.values()) >= 100
    assert "neon dots" not in pool["style"] and "pastel dots" in pool["style"] and pool["object"] == mc.OBJECTS
    words = set(mc.data.VOCABULARY)
    assert all(set(c.split()) <= words for concepts in pool.values() for c in concepts)
    assert len(set(pool["style"])) == len(pool["style"])


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
    assert np.mean(hits) >= 0.6  # chance: 1/48
    # Object: the silhouettes differ (same style and seed, different object -> clearly different images).
    imgs = {o: np.asarray(mc.render("ink sketch", o, 5)).astype(float) for o in mc.OBJECTS}
    for i, o1 in enumerate(mc.OBJECTS):
        for o2 in mc.OBJECTS[i + 1:]:
            assert np.abs(imgs[o1] - imgs[o2]).mean() > 5, (o1, o2)


# --------------------------------------------------------------------------------------------------- shipped


def test_shipped_weights_are_small_verified_and_good():
    from diffusers_unlearn.minicanvas import quality

    manifest = mc.verify_weights()
    assert mc_weights.weights_size() <= 30 * 1024 * 1024
    assert set(mc_weights.REQUIRED_FILES) <= set(manifest["files"])
    record = manifest["quality"]  # measured by `python -m diffusers_unlearn.minicanvas.quality --record`
    assert record["seeds"] == mc.EVAL_SEEDS and record["num_inference_steps"] == mc.NUM_INFERENCE_STEPS
    assert record["num_images"] == len(quality.quality_pairs()) * len(mc.EVAL_SEEDS)
    assert record["heldout"]["num_images"] == record["num_images"]
    assert record["heldout"]["templates"] == list(mc.HELDOUT_TEMPLATES)
    assert record["classifiers"]["num_images"] == len(mc.STYLES) * len(mc.OBJECTS)
    assert quality.check_targets(record) == {k: True for k in quality.QUALITY_TARGETS}, record["targets_met"]
    text_config = json.loads((mc_weights.DEFAULT_WEIGHTS_DIR / "pipeline/text_encoder/config.json").read_text())
    assert text_config["hidden_size"] >= 512


def test_quality_pairs_are_balanced():
    from diffusers_unlearn.minicanvas import quality

    pairs = quality.quality_pairs()
    assert len(pairs) == len(set(pairs)) == len(mc.STYLES) * quality.OBJECTS_PER_STYLE
    per_object = {o: sum(p[1] == o for p in pairs) for o in mc.OBJECTS}
    assert set(per_object.values()) == {len(pairs) // len(mc.OBJECTS)}
    with pytest.raises(ValueError, match="objects_per_style"):
        quality.quality_pairs(0)


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
    assert style_acc >= 0.97 and object_acc >= 0.97  # chance: 1/48 and 1/12
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
    # The same in a held-out wording (one per pair, in turn).
    prompts = [mc.prompt(s, o, mc.HELDOUT_TEMPLATES[i % len(mc.HELDOUT_TEMPLATES)]) for i, (s, o) in enumerate(pairs)]
    out = pipe(prompts, num_inference_steps=mc.NUM_INFERENCE_STEPS, guidance_scale=mc.GUIDANCE_SCALE,
               generator=[torch.Generator().manual_seed(mc.EVAL_SEEDS[0]) for _ in pairs], output_type="pt")
    assert sum(p == s for p, (s, _) in zip(style_clf(out.images), pairs)) >= 0.7 * len(pairs)


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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted quick training run, shared by the determinism and the resume tests."""
    from diffusers_unlearn.minicanvas import train as mc_train

    out = tmp_path_factory.mktemp("quick") / "weights"
    return out, mc_train.train(mc_train.QUICK, out)


def test_quick_training_run_is_deterministic_and_loadable(tmp_path: Path, quick_run):
    from diffusers_unlearn.minicanvas import train as mc_train

    out, report = quick_run
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


def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path, monkeypatch, quick_run):
    from diffusers_unlearn.minicanvas import train as mc_train

    straight_dir, _ = quick_run
    # Stop the run during its last diffusion step, after checkpoints of the steps before it.
    calls = {"n": 0}
    update = mc_train._EMA.update

    def failing_update(self):
        calls["n"] += 1
        if calls["n"] == mc_train.QUICK.unet_steps:
            raise KeyboardInterrupt
        update(self)

    monkeypatch.setattr(mc_train._EMA, "update", failing_update)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        mc_train.train(mc_train.QUICK, tmp_path / "resumed", work_dir=work, checkpoint_minutes=0)
    assert not (tmp_path / "resumed").exists()
    state = torch.load(work / "diffusion.pt", weights_only=False)
    assert state["step"] == mc_train.QUICK.unet_steps - 1
    monkeypatch.setattr(mc_train._EMA, "update", update)
    mc_train.train(mc_train.QUICK, tmp_path / "resumed", work_dir=work, checkpoint_minutes=0)
    # Same computation in the same order on the same machine: bit-identical weights.
    straight = mc.verify_weights(straight_dir)["files"]
    resumed = mc.verify_weights(tmp_path / "resumed")["files"]
    assert straight == resumed
    # A work folder of another configuration is refused rather than mixed in.
    from dataclasses import replace

    with pytest.raises(SystemExit, match="another configuration"):
        mc_train.train(replace(mc_train.QUICK, seed=1), tmp_path / "other", work_dir=work)
