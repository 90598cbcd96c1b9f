"""Evaluation: seeded batched generation, UA/IRA/CRA scoring, CLIP zero-shot from a local folder, drift, cost."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST

import diffusers_unlearn as du
from diffusers_unlearn import evaluation as ev
from diffusers_unlearn import minicanvas as mc

STYLES = ["van gogh", "monet", "picasso"]
OBJECTS = ["dog", "cat"]


class ChannelClassifier:
    """Deterministic stand-in for a trained classifier: label = the image's brightest mean colour channel (mod the
    number of labels), so different images get different, reproducible labels. Counts the images it sees."""

    def __init__(self, labels):
        self.labels = list(labels)
        self.seen = 0

    def __call__(self, images):
        x = images if isinstance(images, torch.Tensor) else torch.stack(
            [torch.tensor(list(im.getdata()), dtype=torch.float32).T.reshape(3, im.height, im.width) / 255
             for im in images])
        self.seen += len(x)
        return [self.labels[int(c) % len(self.labels)] for c in x.mean(dim=(2, 3)).argmax(dim=1)]


def tiny_config(**overrides):
    values = dict(styles=STYLES, objects=OBJECTS, template="a {object} in {style} style", seeds=[3, 5],
                  num_inference_steps=3, guidance_scale=3.0, batch_size=5)
    values.update(overrides)
    return ev.EvalConfig(**values)


# ----------------------------------------------------------------------------------------------- generation
def test_generation_is_seeded_per_image_and_independent_of_batching():
    pipe = du.testing.tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True, desc="kept")
    prompts = ["a dog in monet style", "a cat in van gogh style", "a dog in monet style"]
    a = ev.generate_images(pipe, prompts, [1, 2, 1], num_inference_steps=3, guidance_scale=3.0, batch_size=1,
                           progress=False)
    b = ev.generate_images(pipe, prompts, [1, 2, 1], num_inference_steps=3, guidance_scale=3.0, batch_size=3,
                           progress=False)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # batch size does not change an image
    torch.testing.assert_close(a[0], a[2], atol=1e-6, rtol=0)  # same prompt and seed: same image
    assert (a[0] - a[1]).abs().max() > 1e-3
    c = ev.generate_images(pipe, prompts[:1], [2], num_inference_steps=3, guidance_scale=3.0, progress=False)
    assert (a[0] - c[0]).abs().max() > 1e-3  # another seed, another image
    assert pipe._progress_bar_config == {"disable": True, "desc": "kept"}  # the pipeline's bar settings come back


def test_generation_refuses_mismatched_inputs():
    pipe = du.testing.tiny_pipeline(0)
    with pytest.raises(ValueError, match="one seed per prompt"):
        ev.generate_images(pipe, ["a dog"], [1, 2], num_inference_steps=2, guidance_scale=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ev.generate_images(pipe, ["a dog"], [1], num_inference_steps=2, guidance_scale=1.0, batch_size=0)


# ----------------------------------------------------------------------------------------------- scoring
def test_scores_follow_unlearncanvas_definitions():
    cases = [(s, o, 0) for s in STYLES for o in OBJECTS]  # 6 images: vg/dog vg/cat monet/dog monet/cat pic/dog pic/cat
    style_pred = ["van gogh", "monet",  # van gogh: 1 of 2 still recognised -> accuracy 50, UA 50
                  "monet", "monet",  # monet kept: 100
                  "monet", "picasso"]  # picasso kept: 50
    object_pred = ["cat", "cat", "dog", "dog", "dog", "dog"]
    scores = ev.score_predictions(cases, style_pred, object_pred, removed=["van gogh"], domain="style")
    assert scores.ua == pytest.approx(50.0)
    assert scores.ira == pytest.approx(75.0)
    # CRA on the kept styles' images only: dog 2/2, cat 0/2 -> mean 50; the removed style's images do not count
    assert scores.cra == pytest.approx(50.0)
    assert scores.accuracy == {"van gogh": 50.0, "monet": 100.0, "picasso": 50.0}
    assert scores.cross_accuracy == {"dog": 100.0, "cat": 0.0}

    by_object = ev.score_predictions(cases, style_pred, object_pred, removed=["cat"], domain="object")
    assert by_object.ua == pytest.approx(100.0 - 100.0 / 3)  # 1 of the 3 cat images is still called a cat
    assert by_object.ira == pytest.approx(200.0 / 3)  # 2 of the 3 dog images are called a dog
    # CRA: style accuracy on dog images: van gogh 1/1, monet 1/1, picasso 0/1
    assert by_object.cra == pytest.approx(200.0 / 3)

    base = ev.score_predictions(cases, style_pred, object_pred, removed=[], domain="style")
    assert base.ua is None and base.ira == pytest.approx((50 + 100 + 50) / 3)
    everything = ev.score_predictions(cases, style_pred, object_pred, removed=STYLES, domain="style")
    assert everything.ira is None and everything.cra is None


def test_scoring_refuses_what_it_cannot_measure():
    cases = [("monet", "dog", 0)]
    with pytest.raises(ValueError, match="not among the evaluated"):
        ev.score_predictions(cases, ["monet"], ["dog"], removed=["klimt"], domain="style")
    with pytest.raises(ValueError, match="one prediction per image"):
        ev.score_predictions(cases, ["monet", "monet"], ["dog"], removed=[], domain="style")
    with pytest.raises(ValueError, match="domain"):
        ev.score_predictions(cases, ["monet"], ["dog"], removed=[], domain="concept")
    with pytest.raises(ValueError, match="returned 1 labels for 2 images"):
        ev.classify(lambda images: ["monet"], torch.zeros(2, 3, 4, 4))


def test_eval_config_validates_and_a_world_gives_its_own():
    with pytest.raises(ValueError, match="template"):
        tiny_config(template="a {object}")
    with pytest.raises(ValueError, match="seeds"):
        tiny_config(seeds=[])
    with pytest.raises(ValueError, match="duplicates"):
        tiny_config(styles=["monet", "monet"])
    config = mc.eval_world().eval_config(seeds=2)
    assert config.styles == list(mc.STYLES) and config.objects == list(mc.OBJECTS)
    assert config.seeds == list(mc.EVAL_SEEDS)[:2]
    assert config.num_inference_steps == mc.NUM_INFERENCE_STEPS and config.guidance_scale == mc.GUIDANCE_SCALE
    assert config.prompt("neon dots", "cat") == mc.prompt("neon dots", "cat")
    assert len(config.cases()) == len(mc.STYLES) * len(mc.OBJECTS) * 2
    assert mc.eval_world().eval_config(seeds=[7], styles=["neon dots"]).cases() == \
        [("neon dots", o, 7) for o in mc.OBJECTS]
    with pytest.raises(ValueError, match="asked for 6"):
        mc.eval_world().eval_config(seeds=6)


def test_the_old_minicanvas_helpers_still_work_one_release_with_a_future_warning():
    with pytest.warns(FutureWarning, match="eval_world"):
        old = ev.EvalConfig.minicanvas(seeds=2, batch_size=8)
    assert old == mc.eval_world().eval_config(seeds=2, batch_size=8)
    with pytest.warns(FutureWarning, match="load_classifiers"):
        style_clf, object_clf = ev.minicanvas_classifiers()
    assert style_clf.labels == list(mc.STYLES) and object_clf.labels == list(mc.OBJECTS)


def test_eval_world_knows_its_axes_and_refuses_bad_input():
    world = ev.EvalWorld("w", STYLES, OBJECTS, "a {object} in {style} style", heldout_templates=["{style} {object}"])
    assert world.axis("monet", "style") == "style" and world.axis("monet", "w-style") == "style"
    assert world.axis("monet", "object") is None and world.axis("dali", "style") is None
    assert world.fill("a {object} by {style}", "dog", "object") == [f"a dog by {s}" for s in STYLES]
    with pytest.raises(ValueError, match="has no classifiers"):
        world.load_classifiers()
    for bad, match in ((dict(styles=[]), "styles"), (dict(objects=["cat", "cat"]), "duplicates"),
                       (dict(template="a {}"), "template"), (dict(heldout_templates=["{style}"]), "heldout"),
                       (dict(seeds=[-1]), "seeds"), (dict(num_inference_steps=0), "num_inference_steps"),
                       (dict(guidance_scale=float("nan")), "guidance_scale")):
        values = {**dict(name="w", styles=STYLES, objects=OBJECTS, template="a {object} in {style} style"), **bad}
        with pytest.raises(ValueError, match=match):
            ev.EvalWorld(**values)
    with pytest.raises(TypeError, match="render"):
        ev.EvalWorld("w", STYLES, OBJECTS, "a {object} in {style} style", render="draw")


def test_a_named_world_hands_evaluation_its_own_world():
    pipe = mc.load_pipeline()
    assert ev.eval_world_of(pipe) == mc.eval_world()  # the pipeline loaded as the minicanvas world
    assert ev.eval_world_of(du.testing.tiny_pipeline(0), "minicanvas-style") == mc.eval_world()  # by its domain
    assert ev.eval_world_of(du.testing.tiny_pipeline(0)) is None
    assert ev.named_eval_world("minicanvas") == mc.eval_world()
    with pytest.raises(ValueError, match="'tiny'"):
        ev.named_eval_world("tiny")


def test_evaluate_unlearning_scores_the_pipelines_own_images():
    pipe = du.attach(du.testing.tiny_pipeline(0))
    config = tiny_config()
    style_clf, object_clf = ChannelClassifier(STYLES), ChannelClassifier(OBJECTS)
    scores = ev.evaluate_unlearning(pipe, ["monet"], "style", style_clf, object_clf, config, progress=False)
    assert style_clf.seen == object_clf.seen == scores.num_images == len(STYLES) * len(OBJECTS) * 2
    cases = config.cases()
    images = ev.generate_images(pipe, [config.prompt(s, o) for s, o, _ in cases], [seed for *_, seed in cases],
                                num_inference_steps=3, guidance_scale=3.0, progress=False)
    expected = ev.score_predictions(cases, ChannelClassifier(STYLES)(images), ChannelClassifier(OBJECTS)(images),
                                    ["monet"], "style")
    assert (scores.ua, scores.ira, scores.cra) == (expected.ua, expected.ira, expected.cra)
    for value in (scores.ua, scores.ira, scores.cra):
        assert 0.0 <= value <= 100.0
    assert scores.config["seeds"] == [3, 5] and scores.seconds > 0
    again = ev.evaluate_unlearning(pipe, ["monet"], "style", ChannelClassifier(STYLES), ChannelClassifier(OBJECTS),
                                   config, progress=False, images=images)
    assert again.accuracy == scores.accuracy


# ----------------------------------------------------------------------------------------------- CLIP zero-shot
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel and its processor, saved the way save_pretrained writes a real checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from diffusers_unlearn._tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer("a an image in style picture of van gogh monet picasso dog cat".split())
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_zero_shot_classifier_loads_a_local_checkpoint_and_picks_the_most_similar_label(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    clf = ev.CLIPZeroShotClassifier(clip_dir, STYLES, templates=["an image in {} style"])
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = clf(images)
    assert len(labels) == 5 and set(labels) <= set(STYLES)
    assert clf(ev.to_pil(images)) == labels  # PIL input: the same answer
    # Independent check through CLIPModel's own forward: argmax of logits_per_image is the predicted label.
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    inputs = processor(text=[f"an image in {s} style" for s in STYLES], images=ev.to_pil(images),
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.argmax(dim=1).tolist()
    assert labels == [STYLES[i] for i in expected]
    assert clf.logits(images).shape == (5, len(STYLES))


def test_clip_zero_shot_classifier_errors_name_the_problem(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ev.CLIPZeroShotClassifier(tmp_path / "missing", STYLES)
    with pytest.raises(ValueError, match="could not load a CLIP model"):
        ev.CLIPZeroShotClassifier(tmp_path, STYLES)  # an empty folder
    with pytest.raises(ValueError, match="distinct"):
        ev.CLIPZeroShotClassifier(clip_dir, ["monet", "monet"])
    with pytest.raises(ValueError, match="slot"):
        ev.CLIPZeroShotClassifier(clip_dir, STYLES, templates=["no slot"])


# ----------------------------------------------------------------------------------------------- drift and cost
def test_kv_drift_is_the_relative_frobenius_norm_of_the_composed_change():
    pipe = du.attach(du.testing.tiny_pipeline(0))
    assert ev.kv_drift(pipe) == 0.0
    first = pipe.unlearn("van gogh", domain="style", seed=0, **FAST)
    second = pipe.unlearn("dog", domain="object", seed=1, **FAST)
    base = pipe._unlearning().base_weights
    num = sum(float((pipe.request_adapter(first.request_id).delta(k) + pipe.request_adapter(second.request_id)
                     .delta(k)).square().sum()) for k in base)
    den = sum(float(w.square().sum()) for w in base.values())
    drift = ev.kv_drift(pipe)
    assert drift == pytest.approx((num / den) ** 0.5, rel=1e-5) and drift > 0
    per_layer = ev.kv_drift_per_layer(pipe)
    assert set(per_layer) == set(base) and max(per_layer.values()) >= drift * 0.5

    folded = du.testing.tiny_pipeline(0)
    reference = {k: w.clone() for k, w in base.items()}
    pipe.fold()
    # a plain (folded) pipeline compared with explicit base weights gives the same number
    for name, weight in du.kv.adapters.kv_weights(pipe.unet).items():
        du.kv.adapters.kv_weights(folded.unet)[name].data.copy_(weight)
    assert ev.kv_drift(folded, base_weights=reference) == pytest.approx(drift, rel=1e-5)
    with pytest.raises(TypeError, match="attached"):
        ev.kv_drift(du.testing.tiny_pipeline(0))

    costs = ev.request_costs(pipe)
    assert [c["concept"] for c in costs] == ["van gogh", "dog"]
    assert [c["steps"] for c in costs] == [FAST["steps"]] * 2
    assert all(c["seconds"] >= c["loop_seconds"] > 0 for c in costs)
    pipe.rollback(second.request_id)
    pipe.rollback(first.request_id)
    assert ev.kv_drift(pipe) == 0.0


# ----------------------------------------------------------------------------------------------- the command
def test_eval_command_scores_a_ledger_folder_with_clip(clip_dir, tmp_path, capsys):
    from diffusers_unlearn.cli import main

    pipe = du.attach(du.testing.tiny_pipeline(0))
    pipe.unlearn("monet", domain="style", seed=0, **FAST)
    pipe.save_unlearning(tmp_path / "ledger")
    out = tmp_path / "scores.json"
    code = main(["eval", str(tmp_path / "ledger"), "--model", "tiny", "--styles", ",".join(STYLES), "--objects",
                 ",".join(OBJECTS), "--template", "a {object} in {style} style", "--steps", "3", "--eval-seeds", "1",
                 "--clip", str(clip_dir), "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "removed styles: ['monet']" in printed and "K/V drift" in printed
    data = json.loads(out.read_text())
    assert data["removed"] == ["monet"] and data["domain"] == "style"
    assert data["num_images"] == len(STYLES) * len(OBJECTS)
    assert 0 <= data["ua"] <= 100 and data["drift"] == pytest.approx(ev.kv_drift(pipe), rel=1e-5)
    assert [c["concept"] for c in data["costs"]] == ["monet"]
    # a folder that is neither a ledger nor a pipeline is bad input (exit 2), said in one line
    assert main(["eval", str(tmp_path), "--quiet"]) == 2


def test_evaluation_imports_no_world():
    """Evaluation is handed a world (EvalWorld); no module under evaluation/ imports MiniCanvas or the bench, at
    module level or inside a function."""
    import ast
    from pathlib import Path

    root = Path(ev.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(part in ("minicanvas", "bench") for name in names for part in name.split(".")):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders
