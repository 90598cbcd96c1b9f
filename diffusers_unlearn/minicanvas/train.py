"""Train the shipped MiniCanvas model: ``python -m diffusers_unlearn.minicanvas.train``.

Stages, all seeded: render the style x object image set, train a small AutoencoderKL, train the style and
object classifiers, train a small UNet2DConditionModel jointly with a small CLIPTextModel (with some empty prompts
so that classifier-free guidance works), then save everything with a sha256 manifest and measure base quality.

``--quick`` is a seconds-long smoke run of the same code path (tiny step counts, no quality check);
``--evaluate-only`` measures the quality of existing weights without training.

With ``--work-dir DIR`` every stage saves its result there, and the diffusion stage saves a full checkpoint (model,
optimiser, EMA, random-generator state, step) every ``--checkpoint-minutes``; run the same command again after an
interruption and it resumes from the last checkpoint, with the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _tokenizer
from ..families.tiny import SD1_DDIM_CONFIG
from . import data as mc_data
from . import quality
from . import checkpoint as mc_weights
from .classifier import ConceptClassifierNet

__all__ = ["TrainConfig", "FULL", "QUICK", "export_checkpoint", "train", "main"]


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run; the full and quick runs differ only in these values."""

    seed: int = 0
    resolution: int = 32
    train_seeds_per_pair: int = 20  # rendered training images per style x object pair (576 pairs)
    val_seeds_per_pair: int = 6  # held-out renders for the classifiers' check
    # AutoencoderKL: two levels, so 32 px images become 16 x 16 x 4 latents.
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_crop: int = 16  # a convolutional VAE (no attention) learns the same local maps from crops, 4x cheaper
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # Classifiers.
    clf_width: int = 16
    clf_steps: int = 1000
    clf_batch: int = 64
    clf_lr: float = 2e-3
    # Text encoder and UNet, trained jointly.
    # The text space is of SD's order of width (SD 1.x: 768), so that gradient projection has the room it has on a
    # real model; depth and MLP width stay small because the vocabulary is small.
    text_hidden: int = 512
    text_intermediate: int = 1024
    text_layers: int = 2
    text_heads: int = 8
    # Prompts here are at most 11 tokens; the 512-wide text encoder's cost grows with the padded length.
    max_length: int = 20
    unet_channels: tuple[int, ...] = (32, 64, 96)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    p_uncond: float = 0.1  # empty prompt, so classifier-free guidance has an unconditional branch
    p_partial: float = 0.2  # style-only or object-only prompt, so a concept alone means something
    p_main_template: float = 0.3  # full prompts: PROMPT_TEMPLATE this often, else another TRAINING_TEMPLATES wording
    object_only_share: float = 0.5  # of the partial prompts, this share names the object alone (else the style)
    text_lr_scale: float = 1.0  # the text encoder's learning rate relative to unet_lr
    high_noise_share: float = 0.0  # this share of samples takes t from the upper half, where layout is decided
    ema_decay: float = 0.998
    min_snr_gamma: float = 5.0
    # Measure base quality after training (the CLI records it in the manifest).
    evaluate: bool = True
    log_every: int = 100


FULL = TrainConfig()
# Same code path, tiny widths and step counts: a smoke run of a few seconds.
QUICK = replace(
    FULL,
    vae_channels=(8, 16),
    clf_width=8,
    text_hidden=16,
    text_intermediate=32,
    unet_channels=(8, 16, 16),
    train_seeds_per_pair=1,
    val_seeds_per_pair=1,
    vae_steps=2,
    vae_batch=8,
    clf_steps=2,
    clf_batch=16,
    unet_steps=3,
    unet_batch=8,
    unet_warmup=1,
    evaluate=False,
    log_every=1,
)

# Partial prompts used in training: a concept on its own, as unlearning objectives prompt with it (these include
# diffusers_unlearn.prompts' default style / object templates, copied so that retraining stays reproducible).
STYLE_ONLY_TEMPLATES = (
    "{style}",
    "{style} style",
    "an image in {style} style",
    "a painting in {style} style",
    "a picture of a city in {style} style",
    "a portrait in {style} style",
)
OBJECT_ONLY_TEMPLATES = (
    "{object}",
    "a {object}",
    "a photo of a {object}",
    "an image of a {object}",
    "a painting of a {object}",
    "a picture of a {object} in a field",
)


def _log(msg: str) -> None:
    print(f"[minicanvas {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- data


@dataclass
class _Dataset:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    style: torch.Tensor  # long [N]
    obj: torch.Tensor  # long [N]


def _render_chunk(args: tuple[list[tuple[str, str, int]], int]) -> np.ndarray:
    return mc_data.render_batch(*args)


def _render_split(cfg: TrainConfig, first_seed: int, per_pair: int, workers: int = 1) -> _Dataset:
    triples, styles, objects = [], [], []
    for k in range(per_pair):
        for si, s in enumerate(mc_data.STYLES):
            for oi, o in enumerate(mc_data.OBJECTS):
                triples.append((s, o, first_seed + k))
                styles.append(si)
                objects.append(oi)
    if workers > 1 and len(triples) > 256:
        import multiprocessing

        # Rendering is pure and seeded per image, so splitting it over processes does not change the result.
        chunks = [(triples[i : i + 512], cfg.resolution) for i in range(0, len(triples), 512)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            array = np.concatenate(pool.map(_render_chunk, chunks))
    else:
        array = mc_data.render_batch(triples, cfg.resolution)
    return _Dataset(torch.from_numpy(array), torch.tensor(styles), torch.tensor(objects))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------- models


def build_tokenizer(cfg: TrainConfig):
    """The offline CLIP tokenizer: every style word, object word and prompt word is one token."""
    words = list(mc_data.VOCABULARY) + ["-", ","] + [t.replace("{style}", "").replace("{object}", "")
                                        for t in STYLE_ONLY_TEMPLATES + OBJECT_ONLY_TEMPLATES]
    return _tokenizer.build_clip_tokenizer(words, model_max_length=cfg.max_length)


def build_models(cfg: TrainConfig, tokenizer):
    """Fresh (seeded) VAE, text encoder and UNet for ``cfg``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.resolution,
        mid_block_add_attention=False,  # the latent grid is the VAE's highest-cost level; no attention there
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    levels = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (n - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        # Cross-attention only below the highest resolution: that is where text steers layout and texture
        # cheaply, and where the attn2.to_k / attn2.to_v layers that unlearning adapts live.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=8,
    )
    return vae, text_encoder, unet


def build_scheduler():
    """Stable Diffusion 1.x noise schedule, DDIM sampling."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD1_DDIM_CONFIG)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------------- stages


def train_vae(cfg: TrainConfig, vae, train: _Dataset, gen: torch.Generator, device: torch.device) -> float:
    """Reconstruction (L1 + L2) with a small KL term; returns the latent scaling factor (1 / latent std)."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    x_all = _to_float(train.images)
    n, size, crop = len(x_all), cfg.resolution, min(cfg.vae_crop, cfg.resolution)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps, min(100, cfg.vae_steps))
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen)
        ox, oy = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
        # Crop offsets on the latent grid (even), so crops see the same alignment as full images.
        ox, oy = ox - ox % 2, oy - oy % 2
        x = x_all[idx][:, :, oy : oy + crop, ox : ox + crop].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            _log(f"vae step {step + 1}/{cfg.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i : i + 256].to(device)).latent_dist.mean.cpu()
                           for i in range(0, min(n, 2048), 256)])
    return float(1.0 / means.std().clamp_min(1e-3))


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    x_all = _to_float(images)
    for i in range(0, len(x_all), 256):
        post = vae.encode(x_all[i : i + 256].to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _reconstruct_all(vae, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = []
    x_all = _to_float(images)
    for i in range(0, len(x_all), 256):
        post = vae.encode(x_all[i : i + 256].to(device)).latent_dist
        rec = vae.decode(post.mean).sample.clamp(-1, 1)
        out.append(((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Classifier augmentation in [0, 1]: blur, colour gain and noise, as generated images differ from renders."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel,
                                                            groups=3), x)
    gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)
    noise = torch.randn(x.shape, generator=gen) * (0.05 * torch.rand(b, 1, 1, 1, generator=gen))
    return (x * gain + noise).clamp(0, 1)


def train_classifier(cfg: TrainConfig, labels: torch.Tensor, num_classes: int, images: list[torch.Tensor],
                     gen: torch.Generator, device: torch.device, name: str) -> ConceptClassifierNet:
    """One CNN on renders and their VAE reconstructions (the generator's look), with light augmentation."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = ConceptClassifierNet(num_classes, width=cfg.clf_width).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.clf_lr, weight_decay=1e-4)
    n = len(labels)
    t0 = time.time()
    for step in range(cfg.clf_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.clf_lr * _cosine_lr(step, cfg.clf_steps, min(50, cfg.clf_steps))
        idx = torch.randint(0, n, (cfg.clf_batch,), generator=gen)
        source = torch.randint(0, len(images), (cfg.clf_batch,), generator=gen)
        x = torch.stack([images[s][i] for s, i in zip(source.tolist(), idx.tolist())])
        x = _augment(x.permute(0, 3, 1, 2).float() / 255.0, gen)
        loss = F.cross_entropy(net(x.to(device)), labels[idx].to(device), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.clf_steps:
            _log(f"{name} classifier step {step + 1}/{cfg.clf_steps} loss {loss.item():.4f} "
                 f"({time.time() - t0:.0f}s)")
    return net.eval()


@torch.no_grad()
def _accuracy(net: ConceptClassifierNet, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    x = images.permute(0, 3, 1, 2).float() / 255.0
    pred = torch.cat([net(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(x), 512)])
    return float((pred == labels).float().mean())


class _EMA:
    """Exponential moving average of parameters (with the usual warm-up), for smoother sampling weights."""

    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _prompt_table(tokenizer, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, int]]:
    """Token ids of every prompt used in training, and each prompt's row."""
    prompts = [""]
    for s in mc_data.STYLES:
        for o in mc_data.OBJECTS:
            prompts += [mc_data.prompt(s, o, t) for t in mc_data.TRAINING_TEMPLATES]
        prompts += [t.format(style=s) for t in STYLE_ONLY_TEMPLATES]
    for o in mc_data.OBJECTS:
        prompts += [t.format(object=o) for t in OBJECT_ONLY_TEMPLATES]
    ids = tokenizer(prompts, padding="max_length", max_length=cfg.max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids, {p: i for i, p in enumerate(prompts)}


def _atomic_save(obj: object, path: Path) -> None:
    # Written aside and moved in, so that a run killed while saving leaves the previous checkpoint intact.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# The configuration fields each stage's result depends on (a stage result is reused by any run that agrees on
# them, e.g. a run with other diffusion settings reuses the renders, the VAE and the classifiers).
_STAGE_FIELDS = {
    "renders": ("seed", "resolution", "train_seeds_per_pair", "val_seeds_per_pair"),
    "vae": ("seed", "resolution", "train_seeds_per_pair", "val_seeds_per_pair", "vae_channels", "vae_steps",
            "vae_batch", "vae_crop", "vae_lr", "vae_kl_weight"),
}
_STAGE_FIELDS["classifiers"] = _STAGE_FIELDS["vae"] + ("clf_width", "clf_steps", "clf_batch", "clf_lr")


def _stage_config(cfg: TrainConfig, stage: str) -> dict:
    config = asdict(cfg)
    fields = _STAGE_FIELDS.get(stage)
    if fields is None:  # the diffusion stage depends on everything but what only logs or follows training
        return {k: v for k, v in config.items() if k not in ("evaluate", "log_every")}
    return {k: config[k] for k in fields}


def _safe_load(path: Path) -> Any:
    """A checkpoint of tensors, numbers, strings and containers; ``weights_only=True`` never runs code from the file
    (a crafted file is refused, not executed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but plain data, RuntimeError/EOFError when corrupted
        raise SystemExit(f"{path} is not a checkpoint of plain tensors and numbers that can be loaded safely "
                         f"(weights_only=True): {err}") from None


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict | None:
    if not path.exists():
        return None
    state = _safe_load(path)
    expected = _stage_config(cfg, path.stem)
    stored = state.get("config") or {}
    if path.stem == "diffusion" and state.get("step", 0) <= cfg.unet_steps:
        # A finished or interrupted run may be extended with more steps (``--set unet_steps=N``): the cosine
        # schedule is then recomputed for the new total from the stored step on. Every other field must agree.
        expected = {k: v for k, v in expected.items() if k != "unet_steps"}
    if {k: stored.get(k) for k in expected} != expected:
        raise SystemExit(f"checkpoint {path} was written by a run with another configuration; use another "
                         f"--work-dir or delete it (stored: {stored})")
    return state


def train_diffusion(cfg: TrainConfig, unet, text_encoder, tokenizer, scheduler, latents: tuple[torch.Tensor,
                    torch.Tensor], train: _Dataset, scaling: float, gen: torch.Generator,
                    device: torch.device, checkpoint: Path | None = None, checkpoint_seconds: float = 300.0,
                    init_from: dict | None = None) -> None:
    """Epsilon-prediction training of UNet + text encoder (min-SNR weighted), EMA weights copied in at the end.

    With ``checkpoint``, resumes from that file when it exists and saves it every ``checkpoint_seconds``.
    """
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "scale": 1.0},
                             {"params": list(text_encoder.parameters()), "scale": cfg.text_lr_scale}],
                            lr=cfg.unet_lr, weight_decay=1e-2)
    ema = _EMA([unet, text_encoder], cfg.ema_decay)
    first_step = 0
    state = _load_checkpoint(checkpoint, cfg) if checkpoint is not None else None
    if state is None and init_from is not None:
        # A second stage: start from another run's EMA weights with a fresh optimiser and this config's schedule.
        with torch.no_grad():
            for param, value in zip(params, init_from["ema"]):
                param.copy_(value)
        ema.shadow = [p.detach().clone() for p in params]
        _log(f"diffusion training starts from the EMA weights of a checkpoint at step {init_from['step']}")
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = [t.to(device) for t in state["ema"]]
        ema.steps = state["ema_steps"]
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first_step = state["step"]
        _log(f"resumed diffusion training from {checkpoint} at step {first_step}")

    def save(step: int) -> None:
        _atomic_save({"config": asdict(cfg), "step": step, "unet": unet.state_dict(),
                      "text_encoder": text_encoder.state_dict(), "optimizer": opt.state_dict(),
                      "ema": [t.detach().cpu() for t in ema.shadow], "ema_steps": ema.steps,
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}, checkpoint)

    ids, row = _prompt_table(tokenizer, cfg)
    n_templates = len(mc_data.TRAINING_TEMPLATES)
    # Rows of the full prompts (every training wording), the style-only and the object-only prompts per pair.
    full_rows = torch.tensor([[row[mc_data.prompt(mc_data.STYLES[s], mc_data.OBJECTS[o], t)]
                               for t in mc_data.TRAINING_TEMPLATES]
                              for s, o in zip(train.style.tolist(), train.obj.tolist())])
    style_rows = torch.tensor([[row[t.format(style=s)] for t in STYLE_ONLY_TEMPLATES] for s in mc_data.STYLES])
    object_rows = torch.tensor([[row[t.format(object=o)] for t in OBJECT_ONLY_TEMPLATES] for o in mc_data.OBJECTS])
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    mean, std = latents
    n = len(mean)
    t0 = time.time()
    last_save = time.time()
    running = 0.0
    for step in range(first_step, cfg.unet_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * g["scale"] * _cosine_lr(step, cfg.unet_steps, cfg.unet_warmup)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        # Prompt choice per sample: full prompt in one of the training wordings, a partial one (style or object
        # alone), or empty.
        u = torch.rand(cfg.unet_batch, generator=gen)
        pick_style = torch.randint(0, len(STYLE_ONLY_TEMPLATES), (cfg.unet_batch,), generator=gen)
        pick_object = torch.randint(0, len(OBJECT_ONLY_TEMPLATES), (cfg.unet_batch,), generator=gen)
        other = torch.randint(1, max(2, n_templates), (cfg.unet_batch,), generator=gen).clamp_max(n_templates - 1)
        main = torch.rand(cfg.unet_batch, generator=gen) < cfg.p_main_template
        pick_template = torch.where(main, torch.zeros_like(other), other)
        rows = full_rows[idx, pick_template]
        partial = (u >= cfg.p_uncond) & (u < cfg.p_uncond + cfg.p_partial)
        style_only = partial & (torch.rand(cfg.unet_batch, generator=gen) < 1.0 - cfg.object_only_share)
        object_only = partial & ~style_only
        rows[style_only] = style_rows[train.style[idx], pick_style][style_only]
        rows[object_only] = object_rows[train.obj[idx], pick_object][object_only]
        rows[u < cfg.p_uncond] = 0
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        if cfg.high_noise_share > 0:  # (no extra draws otherwise, so earlier configs train as they did)
            half = scheduler.config.num_train_timesteps // 2
            high = torch.rand(cfg.unet_batch, generator=gen) < cfg.high_noise_share
            t = torch.where(high, torch.randint(half, 2 * half, (cfg.unet_batch,), generator=gen), t)
        z, noise, t = z.to(device), noise.to(device), t.to(device)
        noisy = scheduler.add_noise(z, noise, t)
        cond = text_encoder(ids[rows].to(device))[0]
        pred = unet(noisy, t, cond).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        running += loss.item()
        done = step + 1 - first_step
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.unet_steps:
            k = (step % cfg.log_every) + 1
            elapsed = time.time() - t0
            eta = elapsed / done * (cfg.unet_steps - step - 1)
            _log(f"unet step {step + 1}/{cfg.unet_steps} loss {running / k:.4f} "
                 f"({elapsed:.0f}s, {elapsed / done:.3f}s/step, eta {eta:.0f}s)")
            running = 0.0
        if checkpoint is not None and (time.time() - last_save >= checkpoint_seconds or step + 1 == cfg.unet_steps):
            save(step + 1)
            last_save = time.time()
            _log(f"checkpoint at step {step + 1} -> {checkpoint}")
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()


# --------------------------------------------------------------------------------------------------- driver


def train(cfg: TrainConfig, out_dir: str | os.PathLike, device: str | torch.device = "cpu",
          render_workers: int = 1, work_dir: str | os.PathLike | None = None,
          checkpoint_minutes: float = 5.0, init_from: str | os.PathLike | None = None) -> dict:
    """Run every stage and write the weights folder ``out_dir``; returns the training report.

    With ``work_dir``, each finished stage (renders, VAE, classifiers) is kept there and the diffusion stage saves a
    checkpoint every ``checkpoint_minutes``; a second call with the same arguments resumes from them.
    """
    from diffusers import StableDiffusionPipeline

    device = torch.device(device)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    def stage_file(name: str) -> Path | None:
        return work / f"{name}.pt" if work is not None else None

    def load_stage(name: str) -> dict | None:
        path = stage_file(name)
        return _load_checkpoint(path, cfg) if path is not None else None

    def save_stage(name: str, payload: dict) -> None:
        path = stage_file(name)
        if path is not None:
            _atomic_save({"config": _stage_config(cfg, name), "generator": gen.get_state(),
                          "torch_rng": torch.get_rng_state(),
                          "timings": dict(timings), **payload}, path)

    def restore_rng(state: dict) -> None:
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        timings.update(state.get("timings", {}))

    t = time.time()
    rendered = load_stage("renders")
    if rendered is None:
        _log(f"rendering {cfg.train_seeds_per_pair} + {cfg.val_seeds_per_pair} images per pair "
             f"({len(mc_data.STYLES)} styles x {len(mc_data.OBJECTS)} objects)")
        train_set = _render_split(cfg, 0, cfg.train_seeds_per_pair, render_workers)
        # Held-out seeds far from the training ones (and from EVAL_SEEDS, which are generation seeds).
        val_set = _render_split(cfg, 1_000_000, cfg.val_seeds_per_pair, render_workers)
        timings["render_s"] = time.time() - t
        save_stage("renders", {"train": asdict(train_set), "val": asdict(val_set)})
    else:
        _log("renders loaded from the work folder")
        train_set, val_set = _Dataset(**rendered["train"]), _Dataset(**rendered["val"])
        restore_rng(rendered)

    tokenizer = build_tokenizer(cfg)
    vae, text_encoder, unet = build_models(cfg, tokenizer)
    scheduler = build_scheduler()

    t = time.time()
    vae_state = load_stage("vae")
    if vae_state is None:
        scaling = train_vae(cfg, vae, train_set, gen, device)
        timings["vae_s"] = time.time() - t
        save_stage("vae", {"vae": vae.state_dict(), "scaling": scaling})
    else:
        _log("VAE loaded from the work folder")
        vae.load_state_dict(vae_state["vae"])
        vae.to(device).eval()
        scaling = vae_state["scaling"]
        restore_rng(vae_state)
    vae.register_to_config(scaling_factor=scaling)
    latents = _encode_all(vae, train_set.images, device)
    recon_train = _reconstruct_all(vae, train_set.images, device)
    recon_val = _reconstruct_all(vae, val_set.images, device)
    vae_l1 = float((recon_val.float() - val_set.images.float()).abs().mean() / 255.0)
    _log(f"vae: scaling factor {scaling:.4f}, held-out reconstruction L1 {vae_l1:.4f} (0-1 scale)")

    t = time.time()
    clf_state = load_stage("classifiers")
    if clf_state is None:
        style_net = train_classifier(cfg, train_set.style, len(mc_data.STYLES), [train_set.images, recon_train],
                                     gen, device, "style")
        object_net = train_classifier(cfg, train_set.obj, len(mc_data.OBJECTS), [train_set.images, recon_train],
                                      gen, device, "object")
        timings["classifiers_s"] = time.time() - t
        save_stage("classifiers", {"style": style_net.state_dict(), "object": object_net.state_dict()})
    else:
        _log("classifiers loaded from the work folder")
        style_net = ConceptClassifierNet(len(mc_data.STYLES), width=cfg.clf_width)
        object_net = ConceptClassifierNet(len(mc_data.OBJECTS), width=cfg.clf_width)
        style_net.load_state_dict(clf_state["style"])
        object_net.load_state_dict(clf_state["object"])
        style_net.to(device).eval()
        object_net.to(device).eval()
        restore_rng(clf_state)
    clf_report = {
        "style_val_accuracy": _accuracy(style_net, val_set.images, val_set.style, device),
        "object_val_accuracy": _accuracy(object_net, val_set.images, val_set.obj, device),
        "style_val_accuracy_vae_recon": _accuracy(style_net, recon_val, val_set.style, device),
        "object_val_accuracy_vae_recon": _accuracy(object_net, recon_val, val_set.obj, device),
    }
    _log(f"classifiers on held-out renders: {clf_report}")

    t = time.time()
    init_state, init_report = None, None
    if init_from is not None:
        init_path = Path(init_from)
        init_state = _safe_load(init_path)
        if not isinstance(init_state, dict) or not {"ema", "step", "config"} <= init_state.keys():
            raise SystemExit(f"--init-from {init_path} is not a MiniCanvas diffusion checkpoint")
        init_report = {"file": init_path.name, "sha256": hashlib.sha256(init_path.read_bytes()).hexdigest(),
                       "step": init_state["step"], "config": init_state["config"]}
    train_diffusion(cfg, unet, text_encoder, tokenizer, scheduler, latents, train_set, scaling, gen, device,
                    checkpoint=stage_file("diffusion"), checkpoint_seconds=60.0 * checkpoint_minutes,
                    init_from=init_state)
    timings["diffusion_s"] = timings.get("diffusion_s", 0.0) + time.time() - t

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    timings["total_train_s"] = time.time() - t_start
    report = {
        "config": asdict(cfg),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "classifiers": clf_report,
        "vae_val_l1": vae_l1,
        "init_from": init_report,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    mc_weights.save_weights(out, pipe, {"style": (style_net.cpu(), mc_data.STYLES),
                                        "object": (object_net.cpu(), mc_data.OBJECTS)},
                            resolution=cfg.resolution, width=cfg.clf_width, training=report)
    _log(f"saved weights to {out} ({mc_weights.weights_size(out) / 1e6:.2f} MB) after "
         f"{timings['total_train_s']:.0f}s in this process")
    return report


def export_checkpoint(cfg: TrainConfig, work_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write a weights folder from a run in progress: the work folder's VAE and classifiers and the EMA weights
    of its last diffusion checkpoint (the manifest's training report says which step). Changes nothing in
    ``work_dir``; for looking at, or experimenting with, a model before its run ends."""
    from diffusers import StableDiffusionPipeline

    work = Path(work_dir)
    stages = {name: _load_checkpoint(work / f"{name}.pt", cfg) for name in ("vae", "classifiers", "diffusion")}
    missing = [name for name, state in stages.items() if state is None]
    if missing:
        raise SystemExit(f"{work} has no {', '.join(missing)} result yet: nothing to export")
    tokenizer = build_tokenizer(cfg)
    vae, text_encoder, unet = build_models(cfg, tokenizer)
    vae.load_state_dict(stages["vae"]["vae"])
    vae.register_to_config(scaling_factor=stages["vae"]["scaling"])
    diffusion = stages["diffusion"]
    unet.load_state_dict(diffusion["unet"])
    text_encoder.load_state_dict(diffusion["text_encoder"])
    ema = _EMA([unet, text_encoder], cfg.ema_decay)
    ema.shadow = list(diffusion["ema"])
    ema.copy_to_model()
    style_net = ConceptClassifierNet(len(mc_data.STYLES), width=cfg.clf_width)
    object_net = ConceptClassifierNet(len(mc_data.OBJECTS), width=cfg.clf_width)
    style_net.load_state_dict(stages["classifiers"]["style"])
    object_net.load_state_dict(stages["classifiers"]["object"])
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    report = {"config": asdict(cfg), "exported_at_step": diffusion["step"],
              "partial": diffusion["step"] < cfg.unet_steps}
    mc_weights.save_weights(Path(out_dir), pipe, {"style": (style_net.eval(), mc_data.STYLES),
                                                  "object": (object_net.eval(), mc_data.OBJECTS)},
                            resolution=cfg.resolution, width=cfg.clf_width, training=report)
    _log(f"exported step {diffusion['step']}/{cfg.unet_steps} of {work} to {out_dir}")
    return report


def _overrides(cfg: TrainConfig, items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg.__dataclass_fields__:
            raise SystemExit(f"--set expects FIELD=VALUE with FIELD one of {sorted(cfg.__dataclass_fields__)}, "
                             f"got {item!r}")
        current = getattr(cfg, key)
        if isinstance(current, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple):
            out[key] = tuple(int(v) for v in value.split(","))
        else:
            out[key] = type(current)(value)
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m diffusers_unlearn.minicanvas.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="weights folder to write (default: the shipped one; with --quick a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (use with --out to a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    # One thread by default: on a shared 2-core machine it ran about 2x faster than two (no stalls waiting for a
    # descheduled worker), and it keeps results independent of the core count.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default; default 1)")
    p.add_argument("--render-workers", type=int, default=1, help="processes for rendering the image set")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field, e.g. --set unet_steps=8000 (repeatable)")
    p.add_argument("--work-dir", default=None,
                   help="folder for stage results and checkpoints; rerunning the same command resumes from it")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="diffusion checkpoint interval (default 5)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start the diffusion stage from an earlier run's diffusion checkpoint (a second stage)")
    p.add_argument("--export-checkpoint", action="store_true",
                   help="write --out from --work-dir's last checkpoint (a run in progress), no training")
    p.add_argument("--evaluate-only", action="store_true", help="measure the quality of --out's weights, no training")
    p.add_argument("--no-evaluate", action="store_true", help="skip the quality check after training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate_only:
        result = quality.evaluate_weights(args.out or mc_weights.DEFAULT_WEIGHTS_DIR, device=args.device)
        print(json.dumps(result, indent=2))
        return 0
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, seed=args.seed, **_overrides(cfg, args.set))
    if args.no_evaluate:
        cfg = replace(cfg, evaluate=False)
    if args.export_checkpoint:
        if args.work_dir is None or args.out is None:
            print("--export-checkpoint needs --work-dir (the run) and --out (the folder to write)", file=sys.stderr)
            return 2
        export_checkpoint(cfg, args.work_dir, args.out)
        return 0
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="minicanvas-quick-")) / "weights" if args.quick \
            else mc_weights.DEFAULT_WEIGHTS_DIR
    else:
        out = Path(args.out)
    if args.quick and out.resolve() == mc_weights.DEFAULT_WEIGHTS_DIR.resolve():
        print("refusing to overwrite the shipped weights with a --quick run; pass another --out DIR", file=sys.stderr)
        return 2
    train(cfg, out, device=args.device, render_workers=args.render_workers, work_dir=args.work_dir,
          checkpoint_minutes=args.checkpoint_minutes, init_from=args.init_from)
    if cfg.evaluate:
        result = quality.evaluate_weights(out, device=args.device)
        mc_weights.record_quality(out, result)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
