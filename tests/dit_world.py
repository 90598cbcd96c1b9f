"""A tiny SD3 / Flux transformer that reads its text tokens: ``teach_concept_pictures`` trains one briefly (flow
matching) on a world where every built-in concept has its own picture: one random patch, tiled.

A random joint transformer attends almost uniformly over a few hundred text tokens, so its velocity hardly depends
on which words a prompt has: any edit of its text-stream K/V moves every prompt alike, and no erasure method can be
selective on it. A real SD3 or Flux draws what its concept tokens say. This world gives the tiny transformer that
property in seconds, so a test can measure whether an erasure acts on the concept it removes.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusers_unlearn.families.registry import conditioner_for
from diffusers_unlearn.prompts import TEMPLATES
from diffusers_unlearn.vocabulary import DEFAULT_VOCABULARY

# T5 prompts padded to 16 tokens, as the tiny CLIP prompts are (TINY_MAX_LENGTH): training then costs ~5% of the
# 256 / 512 tokens the pipelines pad to by default; unlearning reads the same length from the pipeline.
TAUGHT_MAX_SEQUENCE_LENGTH = 16


def teach_concept_pictures(pipe: Any, *, steps: int = 600, batch_size: int = 16, learning_rate: float = 3e-3,
                          seed: int = 0) -> Any:
    """Train ``pipe.transformer`` (in place; text encoders and VAE untouched) to draw each built-in style and object
    (every template of its domain) as its own picture, and the empty prompt as zero latents. A picture is one random
    vector on every image token: the patch one token covers, tiled (SD3: 2x2 latent pixels x 4 channels, 16 values;
    Flux: one packed token, 4 values). One 4-value colour per latent pixel, as first written, put some of SD3's
    concepts next to each other or to zero. Sets ``pipe.unlearning_max_sequence_length`` to the T5 length it was
    taught at. Returns ``pipe``.

    600 steps: at 300 ESD's selectivity test on SD3 failed at seed 5 of seeds 3-5 (the target moved no more than
    the unrelated prompts, 0.012 each: the world half learnt); at 600 it passes at every seed 0-7."""
    pipe.unlearning_max_sequence_length = TAUGHT_MAX_SEQUENCE_LENGTH
    conditioner = conditioner_for(pipe)
    generator = torch.Generator().manual_seed(seed)
    concepts = [(domain, c) for domain in ("style", "object") for c in DEFAULT_VOCABULARY[domain]]
    shape = conditioner.initial_latents(1, conditioner.default_resolution(), torch.Generator().manual_seed(0)).shape[1:]
    if len(shape) == 2:  # Flux's packed latents [tokens, channels x 2 x 2]: one random vector on every token
        vectors = torch.randn(len(concepts), shape[-1], generator=generator)
        pictures = vectors[:, None, :].expand(-1, *shape)
    else:  # SD3's [channels, h, w]: the same, one random patch (what one image token covers) tiled
        patch = pipe.transformer.config.patch_size
        patches = torch.randn(len(concepts), shape[0], patch, patch, generator=generator)
        pictures = patches.repeat(1, 1, shape[1] // patch, shape[2] // patch)
    prompts, targets = [""], [torch.zeros(shape)]
    for (domain, concept), picture in zip(concepts, pictures):
        for template in TEMPLATES[domain]:
            prompts.append(template.format(concept))
            targets.append(picture)
    targets = torch.stack(targets)
    encoded = conditioner.encode(prompts)
    transformer = pipe.transformer
    trainable = [p.requires_grad for p in transformer.parameters()]
    transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=0.0)
    transformer.train()
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, len(prompts), (batch_size,), generator=generator)
            x0 = targets[rows]
            noise = torch.randn(x0.shape, generator=generator)
            sigma = torch.rand(batch_size, generator=generator)
            s = sigma.view(-1, *[1] * len(shape))
            velocity = conditioner.predict(transformer, (1 - s) * x0 + s * noise, sigma * 1000, encoded.select(rows))
            loss = (velocity.float() - (noise - x0)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    transformer.eval()
    for parameter, flag in zip(transformer.parameters(), trainable):
        parameter.requires_grad_(flag)
    return pipe


# Unrelated prompts of this world: objects and styles other than the target the tests remove ("van gogh").
UNRELATED_PROMPTS = [*(f"a photo of a {o}" for o in ("cat", "horse", "tree", "car", "bird", "house")),
                     *(f"a painting in {s} style" for s in ("monet", "cubism", "anime", "gothic"))]


def base_trajectory(pipe: Any, conditioner: Any, prompts: list[str], request_id: str = "r0001") -> tuple:
    """The x_t and timesteps the velocity measures use: 4 flow-matching steps of the model without ``request_id``,
    seed 7, guidance 3."""
    with pipe.audit(request_id, mode="without"):
        return conditioner.sample_trajectory(
            pipe.transformer, conditioner.encode(prompts), conditioner.encode_unconditional(len(prompts)), steps=4,
            guidance_scale=3.0, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def velocity_moves(pipe: Any, prompts: list[str], request_id: str = "r0001") -> torch.Tensor:
    """[len(prompts)]: how far ``request_id`` moves each prompt's velocity, ||v_after - v_before|| / ||v_before||,
    averaged over the steps of ``base_trajectory``."""
    conditioner = conditioner_for(pipe, guidance_scale=3.0)
    cond = conditioner.encode(prompts)
    latents, timesteps = base_trajectory(pipe, conditioner, prompts, request_id)
    steps = range(len(timesteps))
    with pipe.audit(request_id, mode="without"):
        before = torch.stack([conditioner.predict(pipe.transformer, latents[s], timesteps[s], cond) for s in steps])
    after = torch.stack([conditioner.predict(pipe.transformer, latents[s], timesteps[s], cond) for s in steps])
    return ((after - before).float().flatten(2).norm(dim=2) / before.float().flatten(2).norm(dim=2)).mean(dim=0)

