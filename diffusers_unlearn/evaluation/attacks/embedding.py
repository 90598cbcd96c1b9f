"""``embedding``: textual-inversion recovery with every weight frozen (Concept Inversion, arXiv 2308.01508).

One new token's input embedding is optimised, starting from the concept's own (the mean of its tokens'), with the
ordinary denoising loss on the base model's images of the concept: the pipeline under attack, prompted with the
new token in the concept's place, should reproduce what the model drew before any request. The optimisation runs
on a copy of the text encoder and tokenizer; the UNet is only read (gradients go to the embedding alone). Several
points of the optimisation are scored ("tries") together with the plain prompt, and the best is kept: the attack
never scores below the plain prompt it starts from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..._validation import check_count

from .base import (
    Attack,
    AttackOutcome,
    NoisedBatches,
    TrainingAttackConfig,
    base_pipeline,
    generate_latents,
    pipeline_view,
)

# Reference images of the base model are drawn at seeds from here on, away from the scored images' seeds.
REFERENCE_SEED_OFFSET = 10_000


@dataclass
class EmbeddingAttackConfig(TrainingAttackConfig):
    """Args:
    steps: optimisation steps of the embedding.
    learning_rate: Adam learning rate of the embedding.
    train_batch_size: noised reference latents per step.
    tries: points of the optimisation that are scored (evenly spaced, the last at ``steps``); the plain prompt is
        always scored too and the best of all is the result.
    reference_seeds: base-model images per plain prompt to learn from.
    init: words whose mean token embedding starts the optimisation (default: the concept itself). Another start
        is scored as a try of its own.
    token: the new token's text.
    """

    kind: ClassVar[str] = "embedding"
    steps: int = 200
    learning_rate: float = 5e-3
    tries: int = 2
    reference_seeds: int = 2
    init: str | None = None
    token: str = "<recovered-concept>"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = "attack 'embedding'"
        check_count(self.tries, f"{owner} option tries")
        check_count(self.reference_seeds, f"{owner} option reference_seeds")
        if self.tries > self.steps:
            raise ValueError(f"{owner} option tries ({self.tries}) cannot exceed steps ({self.steps})")
        if self.init is not None and (not isinstance(self.init, str) or not self.init.strip()):
            raise ValueError(f"{owner} option init must be a non-empty string or None, got {self.init!r}")
        if not isinstance(self.token, str) or not self.token.strip() or " " in self.token.strip():
            raise ValueError(f"{owner} option token must be one word, got {self.token!r}")


class _InjectedToken:
    """A trainable vector that replaces the embedding of ``token_id`` wherever it occurs (a forward hook on the
    copied text encoder's input embedding)."""

    def __init__(self, embedding: torch.nn.Embedding, token_id: int, start: torch.Tensor):
        self.token_id = token_id
        self.vector = torch.nn.Parameter(start.detach().clone().float())
        self.handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        mask = (ids == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(output.dtype), output)

    def remove(self) -> None:
        self.handle.remove()


class EmbeddingAttack(Attack):
    def check(self) -> None:
        pipe = self.context.pipe
        if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "text_encoder", None) is None \
                or getattr(pipe, "tokenizer", None) is None:
            raise TypeError(f"the embedding attack needs a pipeline with one text encoder and tokenizer (Stable "
                            f"Diffusion 1.x/2.x); {type(pipe).__name__} has "
                            f"{'two' if getattr(pipe, 'text_encoder_2', None) is not None else 'no'} text encoder(s)")
        token = self.config.token
        if token in pipe.tokenizer.get_vocab() or len(pipe.tokenizer.tokenize(token)) == 1:
            raise ValueError(f"attack 'embedding' option token {self.config.token!r} is already a token of the "
                             f"pipeline's tokenizer: choose a new word")

    def run(self) -> AttackOutcome:
        ctx, cfg = self.context, self.config
        pipe = ctx.pipe
        templates = ctx.plain_templates()
        plain_prompts = ctx.prompts(templates)
        token_prompts = ctx.prompts(templates, concept=cfg.token)

        # What the model drew of the concept before any request: the targets of the inversion.
        first = REFERENCE_SEED_OFFSET + ctx.seed * cfg.reference_seeds
        reference_seeds = [first + i for i in range(cfg.reference_seeds)]
        pairs = [(i, s) for i in range(len(plain_prompts)) for s in reference_seeds]
        base = base_pipeline(pipe)
        latents = generate_latents(base, [plain_prompts[i] for i, _ in pairs], [s for _, s in pairs],
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   batch_size=cfg.batch_size)
        del base

        text_encoder, tokenizer, injected = self._inverted_text_encoder()
        try:
            view = pipeline_view(pipe, text_encoder=text_encoder, tokenizer=tokenizer)
            ids = self._token_ids(tokenizer, token_prompts, injected.token_id)
            prompt_rows = torch.tensor([i for i, _ in pairs])
            batches = NoisedBatches(pipe, latents, ctx.generator(1))
            optimizer = torch.optim.Adam([injected.vector], lr=cfg.learning_rate)
            checkpoints = sorted({cfg.steps * (k + 1) // cfg.tries for k in range(cfg.tries)})
            tries: list[dict[str, Any]] = [{"name": "plain prompt", "step": 0, "accuracy": ctx.plain_accuracy()}]
            if cfg.init is not None:
                tries.append({"name": f"start ({cfg.init!r})", "step": 0,
                              "accuracy": ctx.accuracy(view, token_prompts, "embedding start")})
            losses: list[float] = []
            unet = pipe.unet
            device, dtype = unet.device, next(unet.parameters()).dtype
            with tqdm(total=cfg.steps, desc="embedding attack", unit="step", disable=not ctx.progress,
                      leave=False) as bar:
                for step in range(1, cfg.steps + 1):
                    rows, noisy, timesteps, target = batches.sample(cfg.train_batch_size)
                    hidden = self._encode(text_encoder, ids[prompt_rows[rows]].to(text_encoder.device))
                    prediction = unet(noisy.to(device, dtype), timesteps.to(device),
                                      encoder_hidden_states=hidden.to(device, dtype)).sample
                    loss = F.mse_loss(prediction.float(), target.to(device))
                    # gradients of the embedding only: nothing accumulates in the (frozen) UNet's .grad
                    (grad,) = torch.autograd.grad(loss, [injected.vector])
                    injected.vector.grad = grad
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    bar.update(1)
                    if step in checkpoints:
                        tries.append({"name": f"step {step}", "step": step,
                                      "accuracy": ctx.accuracy(view, token_prompts, f"embedding step {step}")})
        finally:
            injected.remove()
        best = max(range(len(tries)), key=lambda i: (tries[i]["accuracy"], -i))  # ties: the earlier try
        window = max(1, len(losses) // 10)
        return AttackOutcome(
            accuracy=float(tries[best]["accuracy"]),
            steps=cfg.steps,
            num_images=len(token_prompts) * len(cfg.seeds) * (len(tries) - 1),
            details={
                "tries": tries,
                "best_try": tries[best]["name"],
                "reference_images": len(pairs),
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
                "attack_prompts": token_prompts,
            },
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def _inverted_text_encoder(self) -> tuple[torch.nn.Module, Any, _InjectedToken]:
        """Copies of the text encoder and tokenizer with the new token, and its trainable embedding."""
        pipe, cfg = self.context.pipe, self.config
        tokenizer = copy.deepcopy(pipe.tokenizer)
        text_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
        start_words = cfg.init if cfg.init is not None else self.context.concept
        start_ids = tokenizer(start_words, add_special_tokens=False).input_ids
        if not start_ids:
            raise ValueError(f"attack 'embedding': {start_words!r} has no tokens to start from")
        tokenizer.add_tokens([cfg.token])
        token_id = tokenizer.convert_tokens_to_ids(cfg.token)
        with torch.random.fork_rng(devices=[]):  # the new row's random init must not move the global RNG
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
        with torch.no_grad():
            start = embedding.weight[torch.tensor(start_ids, device=embedding.weight.device)].float().mean(dim=0)
            embedding.weight[token_id] = start.to(embedding.weight.dtype)
        return text_encoder, tokenizer, _InjectedToken(embedding, token_id, start)

    def _token_ids(self, tokenizer: Any, prompts: list[str], token_id: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        missing = [p for p, row in zip(prompts, ids) if token_id not in row.tolist()]
        if missing:
            raise ValueError(f"attack 'embedding': the new token is cut off in {missing[0]!r} (the tokenizer keeps "
                             f"{tokenizer.model_max_length} tokens): use shorter plain_templates")
        return ids

    def _encode(self, text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        # as StableDiffusionPipeline.encode_prompt: last hidden state, attention mask only if the config asks
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            pad = getattr(self.context.pipe.tokenizer, "pad_token_id", None)
            mask = (ids != pad).long() if pad is not None else None
        return text_encoder(ids, attention_mask=mask)[0]
