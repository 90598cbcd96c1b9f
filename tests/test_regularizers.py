"""Regularizers: exact invariants (projection, masks, their combination), drift ordering, merging by hand."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import FAST, generate, kv_state

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.analysis import plot_similarity_vs_change, similarity_vs_change
from diffusers_unlearn.kv.merging import MergeStrategy
from diffusers_unlearn.regularizers import regularizer_from_dict
from diffusers_unlearn.regularizers.projection import complement_projector
from diffusers_unlearn.regularizers.selective import top_fraction_masks

TRAIN = dict(FAST, steps=12)


def relative_kv_change(pipe, request_id, vector):
    """max over K/V layers of ||dW c|| / ||W c||."""
    artifact = pipe.request_adapter(request_id)
    base = pipe._unlearning().base_weights
    return max(float((artifact.delta(n) @ vector).norm() / (base[n] @ vector).norm()) for n in artifact.layers)


def protected_vectors(pipe, record):
    """Every embedding the request's GradientProjection report says it protected, as du.concept_embedding gives it."""
    report = next(r for r in record.regularizers if r["name"] == "gradient_projection")["report"]
    vectors = []
    for item in report["protected"]:
        vectors.append((item["concept"], du.concept_embedding(pipe, item["concept"], item["domain"])))
        if item["source"] != "neighbor":
            vectors.append((item["concept"], du.concept_embedding(pipe, item["concept"])))
    return vectors


def assert_projection_invariant(pipe, record, at_least=1):
    vectors = protected_vectors(pipe, record)
    assert len(vectors) >= at_least
    for concept, vector in vectors:
        change = relative_kv_change(pipe, record.request_id, vector)
        assert change < 1e-4, (concept, change)
    target = du.concept_embedding(pipe, record.concept, record.domain)
    assert relative_kv_change(pipe, record.request_id, target) > 1e-2


# ------------------------------------------------------------------------------------ gradient projection
def test_projection_keeps_protected_kv_outputs_exactly_and_moves_the_target(pipe):
    record = pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[du.GradientProjection(keep=["monet"])],
                          **TRAIN)
    report = record.regularizers[0]["report"]
    sources = [p["source"] for p in report["protected"]]
    assert sources[0] == "keep" and sources.count("neighbor") == 8
    assert 0 < report["target_in_span"] < 1
    assert_projection_invariant(pipe, record, at_least=10)
    # DESIGN's public statement: dW @ du.concept_embedding(pipe, B) is zero for the kept concept B
    assert relative_kv_change(pipe, record.request_id, du.concept_embedding(pipe, "monet")) < 1e-4

    second = pipe.unlearn("dog", domain="object", seed=1, regularizers=[du.GradientProjection(neighbors=2)], **TRAIN)
    protected = [p["concept"] for p in second.regularizers[0]["report"]["protected"]]
    assert protected[0] == "van gogh"  # earlier removed concepts are kept automatically
    assert_projection_invariant(pipe, second, at_least=3)


def test_projection_with_full_rank_lora_and_neighbour_threshold(pipe):
    record = pipe.unlearn("cat", domain="object", seed=0, rank="full",
                          regularizers=[du.GradientProjection(keep=["tiger"], neighbors=30, threshold=0.6)], **TRAIN)
    report = record.regularizers[0]["report"]
    sims = [p["similarity"] for p in report["protected"] if p["source"] == "neighbor"]
    assert sims == sorted(sims, reverse=True) and all(s >= 0.6 for s in sims)
    assert_projection_invariant(pipe, record)


def test_projection_matrix_matches_the_formula():
    torch.manual_seed(0)
    c = torch.randn(16, 5, dtype=torch.float64)
    p, info = complement_projector(c)
    eps = max(1e-4, 1e-6 * float(torch.trace(c.T @ c)) / 5)
    expected = torch.eye(16, dtype=torch.float64) - c @ torch.linalg.inv(c.T @ c + eps * torch.eye(5, dtype=torch.float64)) @ c.T
    torch.testing.assert_close(p, expected)
    assert info == {"eps": eps, "pseudo_inverse": False}
    assert (c.T @ p).abs().max() < 1e-4 * c.abs().max()
    parallel = torch.cat([c, c[:, :1] * 2], dim=1)  # exactly dependent: falls back to the pseudo-inverse
    p2, info2 = complement_projector(parallel)
    assert info2["pseudo_inverse"] and (parallel.T @ p2).abs().max() < 1e-8


def test_projection_warns_when_target_lies_in_the_protected_span(pipe):
    with pytest.warns(UserWarning, match="lies in the span"):
        pipe.unlearn("van gogh", domain="style", seed=0,
                     regularizers=[du.GradientProjection(neighbors=40, dedup_cosine=1.0)], **dict(TRAIN, steps=2))


def test_projection_with_nothing_to_protect_warns_and_still_trains(pipe):
    with pytest.warns(UserWarning, match="protects nothing"):
        projection = du.GradientProjection(keep=[], neighbors=0, protect_unconditional=False)
    with pytest.warns(UserWarning, match="nothing to protect"):
        record = pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[projection], **TRAIN)
    assert record.regularizers[0]["report"]["columns"] == 0
    assert pipe.removed_concepts == ["van gogh"]


def test_retaining_the_target_is_refused_before_anything_changes(pipe):
    pipe.unlearn("dog", domain="object", seed=0, **TRAIN)
    before = kv_state(pipe)
    with pytest.raises(ValueError, match="cannot keep 'Van  Gogh': it is the concept being removed"):
        pipe.unlearn("van gogh", regularizers=[du.GradientProjection(keep=["Van  Gogh"])], **TRAIN)
    assert pipe.removed_concepts == ["dog"]
    assert all(torch.equal(v, kv_state(pipe)[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------ selective fine-tuning
@dataclass
class IndependentTopK(du.Regularizer):
    """Recomputes |theta * dL/dtheta| by autograd on the base weights themselves and checks the mask against it."""

    name: ClassVar[str] = "independent_top_k"
    order: ClassVar[int] = 5  # after SelectiveFinetune (0) built its mask, before any training step
    top_k: float = 0.1

    def setup(self, ctx):
        weights = {n: ad.kv_linear(ctx.denoiser, n).weight for n in ctx.adapter.layer_names}
        for w in weights.values():
            w.requires_grad_(True)
        total = sum(ctx.objective.trajectory_losses())
        grads = torch.autograd.grad(total, list(weights.values()))
        for w in weights.values():
            w.requires_grad_(False)
        scores = {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = int(self.top_k * flat.numel())
        cutoff = torch.topk(flat, keep).values.min()
        self.expected = {n: s >= cutoff for n, s in scores.items()}
        for n, mask in ctx.adapter.masks.items():
            assert torch.equal(mask.bool(), self.expected[n]), n


def test_selective_finetune_changes_only_the_top_scored_fraction(pipe):
    probe = IndependentTopK(top_k=0.1)
    record = pipe.unlearn("van gogh", domain="style", seed=0,
                          regularizers=[du.SelectiveFinetune(top_k=0.1), probe], **TRAIN)
    artifact = pipe.request_adapter(record.request_id)
    assert artifact.kind == "dense" and record.adapter["kind"] == "dense"
    changed = {n: artifact.delta(n) != 0 for n in artifact.layers}
    total = sum(m.numel() for m in changed.values())
    n_changed = sum(int(m.sum()) for m in changed.values())
    assert 0 < n_changed <= int(0.1 * total)
    for n, m in changed.items():
        assert not (m & ~probe.expected[n]).any(), n  # every changed element is a top-scored one
    report = record.regularizers[0]["report"]
    assert report["kept_elements"] == int(0.1 * total)


def test_selective_finetune_adapter_saves_loads_audits_rolls_back_and_folds(tmp_path):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    r1 = pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[du.SelectiveFinetune(top_k=0.2)], **TRAIN)
    r2 = pipe.unlearn("dog", domain="object", seed=1, **TRAIN)
    stacked = generate(pipe)
    pipe.save_unlearning(tmp_path)
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    fresh.load_unlearning(tmp_path)
    assert torch.equal(generate(fresh), stacked)
    with pipe.audit(r1.request_id):
        only = generate(pipe)
    reference = du.testing.tiny_pipeline(seed=0)  # the dense request alone, put in by hand as a peft adapter
    ad.install(reference.unet, "manual", pipe.request_adapter(r1.request_id))
    ad.activate(reference.unet, ["manual"])
    assert torch.equal(generate(reference), only)
    pipe.fold()
    assert (generate(pipe) - stacked).abs().max() < 1e-4
    pipe.rollback(r1.request_id)
    assert pipe.removed_concepts == ["dog"] and pipe.unlearning_mode == "folded"
    with pipe.audit(r2.request_id):
        assert pipe.removed_concepts == ["dog"]


def test_top_fraction_masks_keep_the_global_top_k():
    scores = {"a": torch.tensor([[0.1, 5.0], [0.3, 0.2]]), "b": torch.tensor([[4.0, 0.0, 0.5]])}
    masks, cutoff = top_fraction_masks(scores, 3 / 7)
    assert masks["a"].tolist() == [[False, True], [False, False]] and masks["b"].tolist() == [[True, False, True]]
    assert cutoff == 0.5


# ------------------------------------------------------------------------------------ combination
def test_projection_inside_selective_mask_keeps_both_invariants_exactly(pipe):
    top_k = 0.3
    record = pipe.unlearn("van gogh", domain="style", seed=0,
                          regularizers=[du.GradientProjection(keep=["monet"], neighbors=4),
                                        du.SelectiveFinetune(top_k=top_k)], **TRAIN)
    names = [r["name"] for r in record.regularizers]
    assert names == ["selective_finetune", "gradient_projection"]  # ordered: mask first
    artifact = pipe.request_adapter(record.request_id)
    changed = sum(int((artifact.delta(n) != 0).sum()) for n in artifact.layers)
    total = sum(artifact.delta(n).numel() for n in artifact.layers)
    assert 0 < changed <= int(top_k * total)
    assert_projection_invariant(pipe, record, at_least=6)


def test_projection_with_merge_strategy_keeps_invariant(pipe):
    pipe.unlearn("dog", domain="object", seed=0, strategy="merge", **TRAIN)
    record = pipe.unlearn("van gogh", domain="style", seed=1, strategy="merge",
                          regularizers=[du.GradientProjection(keep=["monet"], neighbors=2)], **TRAIN)
    assert record.strategy["strategy"] == "merge"
    assert_projection_invariant(pipe, record)
    assert "dog" in [p["concept"] for p in record.regularizers[0]["report"]["protected"]]


# ------------------------------------------------------------------------------------ drift penalties
def _mean_square_drift(pipe, record):
    artifact = pipe.request_adapter(record.request_id)
    return sum(float(artifact.delta(n).square().sum()) for n in artifact.layers) / sum(
        artifact.delta(n).numel() for n in artifact.layers)


@pytest.mark.parametrize("regularizer", [du.L2Drift, du.L1Drift])
def test_larger_drift_weight_gives_strictly_smaller_drift(regularizer):
    drifts = []
    for weight in (0.0, 1e2, 1e5):
        pipe = du.attach(du.testing.tiny_pipeline(seed=0))
        record = pipe.unlearn("van gogh", domain="style", seed=0, regularizers=[regularizer(weight=weight)], **TRAIN)
        drifts.append(_mean_square_drift(pipe, record))
        assert record.regularizers[0]["weight"] == weight
    assert drifts[0] > drifts[1] > drifts[2], drifts


def test_drift_from_base_counts_earlier_requests(pipe):
    first = pipe.unlearn("van gogh", domain="style", seed=0, **TRAIN)
    second = pipe.unlearn("dog", domain="object", seed=1, regularizers=[du.L2Drift(weight=0.0, reference="base")],
                          **TRAIN)
    d1, d2 = pipe.request_adapter(first.request_id), pipe.request_adapter(second.request_id)
    # the report holds the penalty of the last step, i.e. before the final update: recompute from the ledger
    reported = second.regularizers[0]["report"]["final_drift"]
    total_after = sum(float((d1.delta(n) + d2.delta(n)).square().sum()) for n in d1.layers)
    count = sum(d1.delta(n).numel() for n in d1.layers)
    first_only = sum(float(d1.delta(n).square().sum()) for n in d1.layers) / count
    assert reported > 0.5 * first_only  # includes the earlier request's change, not just this one's
    assert abs(reported - total_after / count) < 0.5 * total_after / count


# ------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: du.SelectiveFinetune(top_k=0), "top_k must be in \\(0, 1\\], got 0"),
        (lambda: du.SelectiveFinetune(top_k=1.5), "top_k must be in"),
        (lambda: du.SelectiveFinetune(top_k=-0.1), "top_k must be in"),
        (lambda: du.L2Drift(weight=-1.0), "weight must be a number >= 0, got -1.0"),
        (lambda: du.L1Drift(weight=-5), "weight must be a number >= 0"),
        (lambda: du.L2Drift(reference="yesterday"), "reference must be one of"),
        (lambda: du.GradientProjection(neighbors=-1), "neighbors must be an integer >= 0"),
        (lambda: du.GradientProjection(threshold=2.0), "threshold must be a cosine"),
        (lambda: du.GradientProjection(keep=["monet", ""]), "keep concept must be a non-empty string"),
        (lambda: MergeStrategy("average"), "unknown merge method 'average'"),
        (lambda: MergeStrategy("ties", density=0.0), "density must be in"),
        (lambda: MergeStrategy("uniform", scale=2.0), "takes no scale"),
    ],
)
def test_bad_regularizer_settings_get_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_the_same_regularizer_twice_is_refused(pipe):
    with pytest.raises(ValueError, match="repeated: \\['l2_drift'\\]"):
        pipe.unlearn("cat", regularizers=[du.L2Drift(), du.L2Drift(weight=1.0)], **TRAIN)


def test_every_regularizer_and_its_settings_go_into_the_ledger(pipe, tmp_path):
    regs = [du.GradientProjection(keep=["monet"], neighbors=2), du.SelectiveFinetune(top_k=0.2),
            du.L1Drift(weight=3.0), du.L2Drift(weight=7.0, reference="base")]
    record = pipe.unlearn("van gogh", domain="style", seed=0, regularizers=regs, **TRAIN)
    stored = {r["name"]: r for r in record.regularizers}
    assert set(stored) == {"gradient_projection", "selective_finetune", "l1_drift", "l2_drift"}
    assert stored["l2_drift"]["weight"] == 7.0 and stored["l2_drift"]["reference"] == "base"
    assert stored["selective_finetune"]["top_k"] == 0.2 and stored["gradient_projection"]["keep"] == ["monet"]
    for entry in record.regularizers:
        rebuilt = regularizer_from_dict({k: v for k, v in entry.items() if k != "report"})
        assert rebuilt.to_dict() == {k: v for k, v in entry.items() if k != "report"}
    pipe.save_unlearning(tmp_path)
    fresh = du.attach(du.testing.tiny_pipeline(seed=0))
    fresh.load_unlearning(tmp_path)
    assert fresh.unlearning_ledger.requests[0].regularizers == record.regularizers


# ------------------------------------------------------------------------------------ analysis
def test_similarity_vs_change_reports_kept_concepts_unchanged(pipe, tmp_path):
    others = ["monet", "picasso", "cubism", ("dog", "object"), ("tower", "object")]
    record = pipe.unlearn("van gogh", domain="style", seed=0,
                          regularizers=[du.GradientProjection(keep=["monet"], neighbors=0)], **TRAIN)
    rows = similarity_vs_change(pipe, "van gogh", others, domain="style", request_id=record.request_id)
    assert [r.similarity for r in rows] == sorted((r.similarity for r in rows), reverse=True)
    by_name = {r.concept: r for r in rows}
    assert by_name["monet"].kv_change_max < 1e-4
    assert all(by_name[c].kv_change > 1e-3 for c in ("picasso", "cubism", "dog", "tower"))
    plot_similarity_vs_change(rows, tmp_path / "sim.png")
    assert (tmp_path / "sim.png").stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert similarity_vs_change(pipe, "van gogh", ["picasso"], domain="style")[0].kv_change > 0
