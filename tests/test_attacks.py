"""Recovery attacks: they never change the pipeline, they are reproducible, they refuse bad input, and the embedding
attack really recovers a concept on MiniCanvas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST
from PIL import Image

import diffusers_unlearn as du
from diffusers_unlearn.cli import main
from diffusers_unlearn.evaluation import ATTACKS, EvalWorld, attack, register_attack
from diffusers_unlearn.evaluation.attacks import ParaphraseAttack, ParaphraseAttackConfig

STYLES = ["van gogh", "monet", "cubism", "picasso"]


class BrightnessClassifier:
    """A deterministic judge for the tiny pipeline's noise images: the label follows the mean brightness."""

    labels = STYLES

    def __call__(self, images: torch.Tensor) -> list[str]:
        return [self.labels[int(float(im.mean()) * 1000) % len(self.labels)] for im in images]


# Smallest settings that still run every step of each kind on the tiny pipeline.
TINY_OPTIONS = {
    "paraphrase": dict(templates=["{} artwork", "a drawing of {}"]),
    "embedding": dict(steps=4, tries=2, reference_seeds=1),
    "finetune": dict(steps=4, kept=["monet", "cubism"], images_per_prompt=1),
    "rollback": {},
}
SHARED = dict(seeds=1, num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def stream():
    """A tiny pipeline with two requests (module-wide; the tests check that attacks leave it as it is)."""
    p = du.attach(du.testing.tiny_pipeline(seed=0))
    p.set_progress_bar_config(disable=True)
    p.unlearn("van gogh", domain="style", seed=0, **FAST)
    p.unlearn("monet", domain="style", seed=1, **FAST)
    return p


def snapshot(pipe) -> dict:
    """Everything an attack must not change: weights, adapters, ledger, mode, embeddings, tokenizer, flags."""
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    return {
        "tensors": {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.state_dict().items()},
        "requires_grad": {f"{m}.{n}": p.requires_grad for m, mod in modules.items() for n, p in mod.named_parameters()},
        "grads": [n for mod in modules.values() for n, p in mod.named_parameters() if p.grad is not None],
        "training": [mod.training for mod in modules.values()],
        "modules": {m: [type(x).__name__ for x in mod.modules()] for m, mod in modules.items()},
        "peft": sorted(getattr(pipe.unet, "peft_config", {}) or {}),
        "vocab": dict(pipe.tokenizer.get_vocab()),
        "ledger": pipe.unlearning_ledger.to_dict(),
        "artifacts": {i: {k: v.clone() for k, v in pipe.request_adapter(i).tensors.items()}
                      for i in pipe.unlearning_ledger.ids()},
        "mode": pipe.unlearning_mode,
        "scheduler": dict(pipe.scheduler.config),
    }


def assert_same(before: dict, after: dict) -> None:
    for key in ("tensors", "artifacts"):
        assert before[key].keys() == after[key].keys(), key
    for name, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][name]), name
    for request_id, tensors in before["artifacts"].items():
        assert tensors.keys() == after["artifacts"][request_id].keys()
        assert all(torch.equal(v, after["artifacts"][request_id][k]) for k, v in tensors.items()), request_id
    for key in ("requires_grad", "grads", "training", "modules", "peft", "vocab", "ledger", "mode", "scheduler"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("kind", sorted(TINY_OPTIONS))
def test_attack_leaves_the_pipeline_exactly_as_it_was(stream, kind):
    before = snapshot(stream)
    result = attack(stream, "van gogh", kind, domain="style", classifier=BrightnessClassifier(), seed=0,
                    **SHARED, **TINY_OPTIONS[kind])
    assert_same(before, snapshot(stream))
    assert result.kind == kind and result.concept == "van gogh"
    assert 0 <= result.plain_accuracy <= 100 and 0 <= result.accuracy <= 100
    assert math.isclose(result.robust_ua, 100 - result.accuracy)
    assert result.seconds > 0 and result.num_images >= 0
    assert result.settings["seed"] == 0 and result.settings["kind"] == kind


def test_embedding_attack_also_leaves_a_folded_pipeline_as_it_was(stream):
    stream.fold()
    try:
        before = snapshot(stream)
        attack(stream, "van gogh", "embedding", domain="style", classifier=BrightnessClassifier(), seed=0, **SHARED,
               **TINY_OPTIONS["embedding"])
        assert_same(before, snapshot(stream))
    finally:
        stream.unfold()


@pytest.mark.parametrize("kind", ["embedding", "finetune"])
def test_optimising_attacks_are_deterministic_for_a_seed(stream, kind):
    def run(seed):
        return attack(stream, "van gogh", kind, domain="style", classifier=BrightnessClassifier(), seed=seed,
                      **SHARED, **TINY_OPTIONS[kind])

    first, again, other = run(0), run(0), run(1)
    # the same computation twice: bit-identical losses and scores
    assert (first.details["loss_first"], first.details["loss_last"]) == \
        (again.details["loss_first"], again.details["loss_last"])
    assert first.accuracy == again.accuracy
    # and the seed is used: another seed draws other noise, timesteps and minibatches
    assert first.details["loss_last"] != other.details["loss_last"]


def test_rollback_attack_rolls_back_every_other_request_and_reports_the_worst(stream):
    result = attack(stream, "van gogh", "rollback", domain="style", classifier=BrightnessClassifier(), seed=0,
                    **SHARED)
    ids = stream.unlearning_ledger.ids()
    assert result.details["rolled_back"] == [ids[1]]  # the monet request; never the attacked concept's own
    per_request = result.details["per_request"]
    assert result.accuracy == max(r["accuracy"] for r in per_request.values())


def test_finetune_attack_trains_on_kept_concepts_only(stream):
    from diffusers_unlearn.evaluation.attacks import FinetuneAttack, FinetuneAttackConfig
    from diffusers_unlearn.evaluation.attacks.base import AttackContext

    config = FinetuneAttackConfig(**SHARED)
    runner = FinetuneAttack(config, AttackContext(stream, "cubism", "style", BrightnessClassifier(), 0, config))
    kept = runner.kept_concepts()
    assert kept and not {"cubism", "van gogh", "monet"} & set(kept)  # neither attacked nor removed


def test_paraphrase_uses_the_given_wordings(stream):
    templates = ["{} artwork", "a drawing of {}"]
    result = attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
                    **SHARED, templates=templates)
    assert list(result.details["accuracy_per_template"]) == templates
    assert result.num_images == len(templates)  # one seed, one prompt per template


def test_an_attack_prompts_a_concept_of_its_world_with_the_worlds_own_wordings_and_images(stream):
    rendered = []

    def render(style, obj, seed, size):
        rendered.append((style, obj, seed, size))
        return Image.new("RGB", (size, size), (10 * STYLES.index(style), 100 if obj == "cat" else 200, seed % 256))

    world = EvalWorld("tw", STYLES, ["cat", "dog"], "a {object} in {style} style",
                      heldout_templates=["{style} art of a {object}"], render=render)
    result = attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
                    world=world, **SHARED)
    assert result.settings["world"] == "tw"
    assert result.settings["plain_prompts"] == ["a cat in van gogh style", "a dog in van gogh style"]
    assert result.details["templates"] == ["{style} art of a {object}"] and result.num_images == 2
    tuned = attack(stream, "van gogh", "finetune", domain="style", classifier=BrightnessClassifier(), seed=0,
                   world=world, **SHARED, **TINY_OPTIONS["finetune"])
    # trained on the world's images of the kept styles across its objects: 2 kept x 2 objects x 1 image
    assert tuned.details["training_data"] == "tw renders" and tuned.details["training_images"] == 4
    assert sorted({(s, o) for s, o, _, _ in rendered}) == [(s, o) for s in ("cubism", "monet") for o in ("cat", "dog")]
    # outside a world the same attack prompts the concept with the domain's generic templates
    generic = attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
                     **SHARED)
    assert generic.settings["world"] is None and "cat" not in " ".join(generic.settings["plain_prompts"])
    with pytest.raises(ValueError, match="slots"):  # a two-slot template needs a concept of the world
        attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
               templates=["a {object} in {style}"], **SHARED)
    with pytest.raises(TypeError, match="EvalWorld"):
        attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
               world="minicanvas", **SHARED)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kind", "options", "error", "named"),
    [
        ("nope", {}, ValueError, "'nope'"),
        ("embedding", {"lr": 1.0}, TypeError, "['lr']"),
        ("embedding", {"learning_rate": float("nan")}, ValueError, "nan"),
        ("embedding", {"steps": 0}, ValueError, "steps"),
        ("embedding", {"steps": 2, "tries": 3}, ValueError, "tries"),
        ("finetune", {"rank": -1}, ValueError, "-1"),
        ("finetune", {"kept": "monet"}, ValueError, "'monet'"),
        ("paraphrase", {"templates": ["no slot here"]}, ValueError, "'no slot here'"),
        ("paraphrase", {"seeds": 0}, ValueError, "seeds"),
        ("paraphrase", {"guidance_scale": float("inf")}, ValueError, "inf"),
    ],
)
def test_bad_kinds_and_options_are_refused_by_name(stream, kind, options, error, named):
    with pytest.raises(error) as info:
        attack(stream, "van gogh", kind, domain="style", classifier=BrightnessClassifier(), seed=0, **options)
    assert named in str(info.value)
    if kind == "nope":
        assert all(k in str(info.value) for k in ("embedding", "finetune", "paraphrase", "rollback"))


def test_bad_concept_seed_and_classifier_are_refused(stream):
    clf = BrightnessClassifier()
    with pytest.raises(ValueError, match="'dali'"):  # the classifier could never name it
        attack(stream, "dali", "paraphrase", domain="style", classifier=clf, seed=0)
    with pytest.raises(ValueError, match="-1"):
        attack(stream, "van gogh", "paraphrase", domain="style", classifier=clf, seed=-1)
    with pytest.raises(ValueError, match="'nowhere'"):
        attack(stream, "van gogh", "paraphrase", domain="nowhere", classifier=clf, seed=0)
    with pytest.raises(TypeError, match="callable"):
        attack(stream, "van gogh", "paraphrase", domain="style", classifier="clip", seed=0)
    with pytest.raises(ValueError, match="already a token"):
        attack(stream, "van gogh", "embedding", domain="style", classifier=clf, seed=0, token="monet")


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="'paraphrase' is already registered"):
        register_attack(ParaphraseAttackConfig, ParaphraseAttack)
    assert ATTACKS["paraphrase"] is ParaphraseAttack


# --------------------------------------------------------------------------------------------- on MiniCanvas
@pytest.fixture(scope="module")
def minicanvas():
    from diffusers_unlearn import minicanvas as mc

    style_clf, _ = mc.load_classifiers()
    return mc, style_clf


def _minicanvas_pipe(mc):
    pipe = du.attach(mc.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


MC_EMBEDDING = dict(seeds=1, steps=100, tries=2, learning_rate=5e-3, progress=False)


@pytest.mark.slow  # 45 s for a recorded negative result; run with -m slow
@pytest.mark.xfail(strict=True, reason=(
    "measured on the 48-style MiniCanvas (issue 9): after ESD (eta 5, 100 steps, lr 2e-3) the embedding attack at "
    "these settings recovers 'neon lines' in 0 of 6 images (plain prompt 0 of 6); on the previous 12-style world "
    "it recovered 4 of 6. Strict: passes again, and must be un-marked, once the attack is strong enough here."))
def test_embedding_attack_recovers_a_style_erased_by_esd(minicanvas):
    mc, style_clf = minicanvas
    pipe = _minicanvas_pipe(mc)
    pipe.unlearn("neon lines", du.ESDConfig(negative_guidance=5.0, sampling_steps=20, guidance_scale=5.0,
                                            num_trajectories=6),
                 domain="style", templates=[mc.PROMPT_TEMPLATE.format(object=o, style="{}") for o in mc.OBJECTS],
                 steps=100, learning_rate=2e-3, rank=4, seed=0, progress=False)
    result = attack(pipe, "neon lines", "embedding", domain="style", classifier=style_clf, seed=0, **MC_EMBEDDING)
    assert result.plain_accuracy <= 100 / 3  # erased: at most 2 of the 6 plain images show it
    assert result.accuracy >= result.plain_accuracy + 100 / 3  # recovered in at least 2 more images
    assert result.details["best_try"] != "plain prompt"


def test_embedding_attack_finds_the_concept_from_a_wrong_start_on_the_base_model(minicanvas):
    mc, style_clf = minicanvas
    pipe = _minicanvas_pipe(mc)
    # start from another family's style: the optimisation alone must find the way to "neon lines"
    result = attack(pipe, "neon lines", "embedding", domain="style", classifier=style_clf, seed=0, init="ink sketch",
                    **{**MC_EMBEDDING, "learning_rate": 1e-2})
    tries = {t["name"]: t["accuracy"] for t in result.details["tries"]}
    assert tries["start ('ink sketch')"] <= 100 / 3  # the start draws ink sketch, not neon lines
    assert tries[f"step {MC_EMBEDDING['steps']}"] >= 2 * 100 / 3  # the learnt embedding draws neon lines
    assert result.accuracy >= result.plain_accuracy  # never below the plain prompt


def test_cli_attack_prints_a_table_and_refuses_bad_input(capsys):
    code = main(["attack", "minicanvas", "--concept", "neon dots", "--kind", "paraphrase", "--eval-seeds", "1",
                 "--quiet", "--option", 'paraphrase.templates=["a {object} in {style}"]'])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| paraphrase |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(0 <= float(c) <= 100 for c in cells[1:5])
    assert main(["attack", "minicanvas", "--concept", "neon dots", "--kind", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main(["attack", "minicanvas", "--concept", "neon dots", "--kind", "embedding",
                 "--option", "embedding.lr=3"]) == 2
    assert "['lr']" in capsys.readouterr().err


def test_model_card_gains_a_robustness_section_only_when_measured(stream):
    result = attack(stream, "van gogh", "paraphrase", domain="style", classifier=BrightnessClassifier(), seed=0,
                    **SHARED, templates=["{} artwork"])
    plain_card = str(stream.unlearned_model_card())
    assert "Robustness" not in plain_card
    card = str(stream.unlearned_model_card(evaluation={"robustness": [result.to_dict()], "ua": 100.0}))
    section = card.split("## Robustness to recovery attacks", 1)[1]
    assert f"| van gogh | paraphrase | {result.plain_accuracy:.1f} | {result.accuracy:.1f} | " \
           f"{result.robust_ua:.1f} |" in section
    assert "| all requests | ua |" in card  # the other figures stay in the evaluation table
    with pytest.raises(ValueError, match="robustness"):
        stream.unlearned_model_card(evaluation={"robustness": [{"kind": "paraphrase"}]})


def test_bench_report_adds_robust_ua_columns_after_the_last_request():
    from diffusers_unlearn.bench import BenchSettings
    from diffusers_unlearn.bench.report import attack_section, headline

    def row(ua, attacks=None):
        out = {"ua": ua, "ira": 90.0, "cra": 80.0, "drift": 0.1, "cumulative_steps": 10, "cumulative_seconds": 1.0}
        return {**out, "attacks": attacks} if attacks else out

    attacked = {"embedding": {"ua": 100.0, "robust_ua": 37.5, "steps": 200, "seconds": 12.0},
                "paraphrase": {"ua": 100.0, "robust_ua": 87.5, "steps": 0, "seconds": 3.0}}
    result = {"stream": ["a", "b"], "protocols": {
        "sequential": {"label": "Sequential", "rows": [row(None), row(100.0), row(100.0, attacked)]}}}
    header, _, line = headline(result)
    assert header.endswith("| robust UA (embedding) | robust UA (paraphrase) |")
    assert line.endswith("| 37.5 | 87.5 |")
    section = "\n".join(attack_section(result))
    assert "| Sequential | embedding | 100.0 | 37.5 | -62.5 | 200 | 12.0 |" in section
    assert attack_section({**result, "protocols": {"sequential": {"label": "S", "rows": [row(100.0)]}}}) == []
    assert BenchSettings(attacks="paraphrase, embedding").attacks == ["paraphrase", "embedding"]
    with pytest.raises(ValueError, match="'nope'"):
        BenchSettings(attacks=["nope"])


def test_bench_attacks_every_removed_concept_after_the_last_request_only():
    from diffusers_unlearn.bench import BenchSettings, BenchWorld, Hyperparameters, run_protocol
    from diffusers_unlearn.bench.protocols import resolve_protocols
    from diffusers_unlearn.evaluation import EvalConfig

    class ObjectClassifier:
        labels = ["cat", "dog"]

        def __call__(self, images):
            return [self.labels[int(float(im.mean()) * 1000) % 2] for im in images]

    def load():
        pipe = du.testing.tiny_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    config = EvalConfig(styles=STYLES[:3], objects=["cat", "dog"], template="a {object} in {style} style", seeds=[0],
                        num_inference_steps=3, guidance_scale=5.0)
    world = BenchWorld("tinyworld", config, load, BrightnessClassifier(), ObjectClassifier())
    settings = BenchSettings(requests=2, protocols=["sequential"], hparams=Hyperparameters(steps=2),
                             attacks=["paraphrase", "rollback"])
    rows = run_protocol(world, settings, resolve_protocols(["sequential"])[0], {"request": 0}, progress=False)
    assert [("attacks" in r) for r in rows] == [False, False, True]
    attacks = rows[-1]["attacks"]
    assert list(attacks) == ["paraphrase", "rollback"]
    removed = STYLES[:2]
    for kind, figures in attacks.items():
        assert list(figures["accuracy"]) == removed
        assert math.isclose(figures["robust_ua"], 100 - sum(figures["accuracy"].values()) / len(removed))
        assert math.isclose(figures["ua"], 100 - sum(figures["plain_accuracy"].values()) / len(removed))


# ------------------------------------------------------------------------------------ on SDXL, SD3 and Flux
FLOW_BUILDERS = {"sdxl": du.testing.tiny_sdxl_pipeline, "sd3": du.testing.tiny_sd3_pipeline,
                 "flux": du.testing.tiny_flux_pipeline}
# every token table a prompt goes through: SDXL's two CLIPs; SD3's CLIP-L, CLIP-G and T5; Flux's CLIP-L (pooled
# text) and T5
FLOW_TABLES = {"sdxl": ["text_encoder", "text_encoder_2"], "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"],
               "flux": ["text_encoder", "text_encoder_2"]}
FLOW_OPTIONS = {
    "embedding": dict(steps=4, tries=2, reference_seeds=1, learning_rate=5e-2),
    "finetune": dict(steps=4, kept=["monet", "cubism"], images_per_prompt=1, learning_rate=1e-2),
}


@pytest.fixture(scope="module", params=sorted(FLOW_BUILDERS))
def flow_stream(request):
    """A tiny SDXL / SD3 / Flux pipeline with one request (module-wide; the tests check that attacks leave it as it is)."""
    p = du.attach(FLOW_BUILDERS[request.param](seed=0))
    p.set_progress_bar_config(disable=True)
    p.unlearn("van gogh", domain="style", seed=0, **FAST)
    return request.param, p


def flow_snapshot(pipe) -> dict:
    """Every module's tensors and flags, every tokenizer's vocabulary, the ledger and adapters, and an image."""
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    images = pipe(["a cat in van gogh style", "a dog"], num_inference_steps=3, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    return {
        "tensors": {f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.state_dict().items()},
        "requires_grad": {f"{m}.{n}": p.requires_grad for m, mod in modules.items() for n, p in mod.named_parameters()},
        "grads": [n for mod in modules.values() for n, p in mod.named_parameters() if p.grad is not None],
        "training": [mod.training for mod in modules.values()],
        "vocab": {k: dict(v.get_vocab()) for k, v in pipe.components.items() if k.startswith("tokenizer")},
        "ledger": pipe.unlearning_ledger.to_dict(),
        "artifacts": {i: {k: v.clone() for k, v in pipe.request_adapter(i).tensors.items()}
                      for i in pipe.unlearning_ledger.ids()},
        "images": images,
    }


@pytest.mark.parametrize("kind", sorted(FLOW_OPTIONS))
def test_attacks_on_sdxl_sd3_and_flux_change_the_output_and_restore_the_pipeline(flow_stream, kind):
    family, pipe = flow_stream
    before = flow_snapshot(pipe)
    result = attack(pipe, "van gogh", kind, domain="style", classifier=BrightnessClassifier(), seed=0, **SHARED,
                    **FLOW_OPTIONS[kind])
    after = flow_snapshot(pipe)
    # the same computation on an unchanged pipeline: the images agree to float rounding, the weights exactly
    torch.testing.assert_close(after.pop("images"), before.pop("images"), rtol=0, atol=1e-6)
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(torch.equal(t, after["tensors"][name]) for name, t in before["tensors"].items())
    for request_id, tensors in before.pop("artifacts").items():
        assert all(torch.equal(v, after["artifacts"][request_id][k]) for k, v in tensors.items())
    after.pop("artifacts")
    before.pop("tensors"), after.pop("tensors")
    assert before == after  # flags, grads, vocabularies, ledger
    # measured effect, the same prompts and seeds either side: a 16x16 image in [0, 1] changes by far more than the
    # float rounding (<1e-6) the restored pipeline shows above
    assert result.details["image_change"] > 1e-4, result.details
    if kind == "embedding":
        assert result.details["text_encoders"] == FLOW_TABLES[family]
        assert all(shift > 0.01 for shift in result.details["embedding_shift"].values()), result.details
        assert result.details["loss_last"] != result.details["loss_first"]
    else:
        assert result.details["lora_parameters"] > 0 and result.details["training_images"] > 0


def test_the_finetune_attack_on_a_transformer_adapts_the_text_stream_too():
    from diffusers_unlearn.evaluation.attacks.finetune import lora_targets
    from diffusers_unlearn.families.registry import FAMILIES

    assert lora_targets(FAMILIES["unet"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert {"add_k_proj", "add_v_proj", "to_q"} <= set(lora_targets(FAMILIES["flux"]))
