import os

import pytest
import torch

# Tiny models run fastest on one thread, and bit-exact comparisons across processes need the same thread count.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import diffusers_unlearn as du  # noqa: E402

PROMPT = "a painting in van gogh style"


def generate(pipe, prompt: str = PROMPT, seed: int = 0, steps: int = 4, **kwargs) -> torch.Tensor:
    """Deterministic images from the pipeline as a float tensor [B, 3, H, W] (``kwargs`` go to the pipeline)."""
    return pipe(
        prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs
    ).images


def kv_state(pipe) -> dict[str, torch.Tensor]:
    """Every K/V tensor in the UNet (base weights and adapter factors), cloned."""
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "attn2.to_" in n}


FAST = dict(steps=6, sampling_steps=4, num_trajectories=2, learning_rate=1e-2)


@pytest.fixture
def pipe():
    return du.attach(du.testing.tiny_pipeline(seed=0))


@pytest.fixture(scope="module")
def two_requests():
    """A pipeline with two sequential ESD requests (built once per module; tests must not change it)."""
    p = du.attach(du.testing.tiny_pipeline(seed=0))
    p.unlearn("van gogh", domain="style", seed=0, **FAST)
    p.unlearn("dog", domain="object", seed=1, **FAST)
    return p
