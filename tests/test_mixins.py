"""mixin.py, saving_mixin.py: ``attach`` and ``UnlearnMixin``, one capability per mixin (the unlearning methods
themselves are tested in test_engine.py and test_trainer.py, saving in test_deploy.py)."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import StableDiffusionPipeline

import diffusers_unlearn as du


def _public(cls):
    return {name for name, _ in inspect.getmembers(cls) if not name.startswith("_") and name in vars(cls)}


def test_attach_keeps_class_name_and_is_idempotent(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert isinstance(pipe, du.UnlearnMixin)
    assert du.attach(pipe) is pipe
    assert pipe.removed_concepts == []


def test_attach_makes_one_class_per_pipeline_class_that_keeps_its_name_and_module():
    first, second = (du.attach(du.testing.tiny_pipeline(seed=s)) for s in (0, 1))
    cls = type(first)
    assert type(second) is cls and cls.__bases__ == (du.UnlearnMixin, StableDiffusionPipeline)
    assert (cls.__name__, cls.__module__) == (StableDiffusionPipeline.__name__, StableDiffusionPipeline.__module__)
    assert first.base_fingerprint == du.attach(du.testing.tiny_pipeline(seed=0)).base_fingerprint
    assert first.base_fingerprint != second.base_fingerprint  # each instance's own weights are its base


def test_the_two_mixins_share_no_public_name_and_the_combined_one_adds_none():
    assert [c.__name__ for c in du.UnlearnMixin.__bases__] == ["RequestStreamMixin", "SavingMixin"]
    unlearning, saving = (_public(c) for c in du.UnlearnMixin.__bases__)
    assert unlearning and saving and not unlearning & saving
    assert not _public(du.UnlearnMixin)  # UnlearnMixin only combines them
    assert {"unlearn", "audit", "rollback", "fold"} <= unlearning
    assert {"save_unlearning", "save_unlearned", "export_lora", "push_to_hub"} <= saving


def test_attach_refuses_a_pipeline_without_cross_attention():
    class NoUnet:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="supported: Stable Diffusion 1.x/2.x and SDXL"):
        du.attach(NoUnet())
