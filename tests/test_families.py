"""families.py: which denoiser a pipeline has, which of its layers read the text, and the family registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

import diffusers_unlearn as du
from diffusers_unlearn.kv import adapters as ad
from diffusers_unlearn.families.registry import FAMILIES, denoiser_of, family_of, register_family, supported_architectures

TINY = {"unet": du.testing.tiny_pipeline, "unet-sdxl": du.testing.tiny_sdxl_pipeline,
        "sd3": du.testing.tiny_sd3_pipeline, "flux": du.testing.tiny_flux_pipeline}


@pytest.mark.parametrize("kind", list(TINY))
def test_each_tiny_pipeline_has_its_family_and_exactly_the_text_kv_layers(kind):
    pipe = TINY[kind](seed=0)
    family = family_of(pipe)
    assert family.name == kind.split("-")[0]
    denoiser = denoiser_of(pipe)
    assert denoiser is getattr(pipe, family.denoiser_attr)
    names = ad.kv_module_names(denoiser)
    expected = [n for n, m in denoiser.named_modules()
                if isinstance(m, torch.nn.Linear) and n.endswith(family.kv_suffixes)]
    assert names == expected and names  # every Linear with a K/V suffix, in module order
    assert not any(n.startswith("single_transformer_blocks") for n in names)  # Flux's single stream: left alone
    prompt_only = family.prompt_only_layers(names)
    if family.denoiser_attr == "unet":  # a UNet's cross-attention reads the text alone everywhere
        assert prompt_only == names
    else:  # a joint transformer's first block only: later blocks read a text stream that attended to the image
        assert prompt_only == [n for n in names if n.startswith("transformer_blocks.0.")] and len(prompt_only) == 2


def test_a_subclass_of_a_known_denoiser_belongs_to_its_family():
    pipe = du.testing.tiny_pipeline(seed=0)

    class MyUNet(UNet2DConditionModel):
        pass

    pipe.unet.__class__ = MyUNet
    assert family_of(pipe).name == "unet"


def test_an_unknown_denoiser_is_refused_naming_every_supported_family():
    class Pipe:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError) as caught:
        family_of(Pipe())
    assert supported_architectures() in str(caught.value)
    assert all(f.description in str(caught.value) for f in FAMILIES.values())


def test_a_family_name_is_registered_once():
    with pytest.raises(ValueError, match="'unet' is already registered"):
        register_family(dataclasses.replace(FAMILIES["unet"], description="another"))
    assert FAMILIES["unet"].description.startswith("Stable Diffusion 1.x/2.x and SDXL")
