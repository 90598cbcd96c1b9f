"""``embedding``: textual-inversion recovery with every weight frozen (Concept Inversion, arXiv 2308.01508).

One new token is added to every tokenizer of the pipeline and its input embedding is optimised in every text
encoder's token table the prompt goes through (Stable Diffusion 1.x/2.x: CLIP; SDXL: both CLIPs; SD3: CLIP-L,
CLIP-G and T5; Flux: CLIP-L, whose pooled text it reads, and T5), each starting from the concept's own (the mean of
its tokens' rows in that table), with the ordinary denoising loss (flow matching for SD3 and Flux) on the base
model's images of the concept: the pipeline under attack, prompted with the new token in the concept's place,
should reproduce what the model drew before any request. The optimisation runs on copies of the text encoders and
tokenizers; the denoiser is only read (gradients go to the embeddings alone). Several points of the optimisation
are scored ("tries") together with the plain prompt, and the best is kept: the attack never scores below the plain
prompt it starts from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..._validation import check_count
from ...families.registry import conditioner_for, denoiser_of, text_encoder_pairs
from .base import (
    Attack,
    AttackOutcome,
    NoisedBatches,
    TrainingAttackConfig,
    base_pipeline,
    differentiable_encode,
    generate_latents,
    pipeline_view,
)

# Reference images of the base model are drawn at seeds from here on, away from the scored images' seeds.
REFERENCE_SEED_OFFSET = 10_000


@dataclass
class EmbeddingAttackConfig(TrainingAttackConfig):
    """Settings of the ``embedding`` attack.

    Args:
        steps: optimisation steps of the embedding.
        learning_rate: Adam learning rate of the embedding.
        train_batch_size: noised reference latents per step.
        tries: points of the optimisation that are scored (evenly spaced, the last at ``steps``); the plain prompt
            is always scored too and the best of all is the result.
        reference_seeds: base-model images per plain prompt to learn from.
        init: words whose mean token embedding starts the optimisation (default: the concept itself). Another
            start is scored as a try of its own.
        token: the new token's text.
        seeds: as in ``AttackConfig``.
        num_inference_steps: as in ``AttackConfig``.
        guidance_scale: as in ``AttackConfig``.
        batch_size: as in ``AttackConfig``.
        plain_templates: as in ``AttackConfig``.
        progress: as in ``AttackConfig``.
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


@dataclass
class _Table:
    """One text encoder's copy with the new token: its pipeline attributes, tokenizer, encoder, trainable row and
    the token length the pipeline pads its prompts to."""

    tokenizer_attr: str
    encoder_attr: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    injected: _InjectedToken
    max_length: int


class EmbeddingAttack(Attack):
    """Textual-inversion recovery: learn one new token's embedding, every weight frozen (module docstring).

    Args:
        config: the attack's settings.
        context: the pipeline, concept, classifier and world it attacks.
    """

    def encoder_pairs(self) -> list[tuple[str, str]]:
        """The (tokenizer, text encoder) attributes the pipeline holds, in ``TEXT_ENCODERS`` order (the attack
        learns the new token in each)."""
        return text_encoder_pairs(self.context.pipe)

    def check(self) -> None:
        """Refuse a pipeline without a text encoder, or a ``token`` its tokenizers already know.

        Raises:
            TypeError: the pipeline has no text encoder with its tokenizer.
            ValueError: ``token`` is already a token of one of the pipeline's tokenizers.
        """
        pipe = self.context.pipe
        if not self.encoder_pairs():
            raise TypeError(f"the embedding attack needs a pipeline with a text encoder and its tokenizer; "
                            f"{type(pipe).__name__} has none")
        token = self.config.token
        for tokenizer_attr, _ in self.encoder_pairs():
            tokenizer = getattr(pipe, tokenizer_attr)
            if token in tokenizer.get_vocab() or len(tokenizer.tokenize(token)) == 1:
                raise ValueError(f"attack 'embedding' option token {token!r} is already a token of the pipeline's "
                                 f"{tokenizer_attr}: choose a new word")

    def run(self) -> AttackOutcome:
        """Learn the embedding on the base model's images, score each try and the plain prompt, keep the best.

        Returns:
            The accuracy under attack, its optimisation steps, the number of images scored and per-kind details.
        """
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

        tables = self._inverted_text_encoders()
        try:
            replaced = {}
            for table in tables:
                replaced.update({table.tokenizer_attr: table.tokenizer, table.encoder_attr: table.text_encoder})
            view = pipeline_view(pipe, **replaced)
            conditioner = conditioner_for(view, guidance_scale=cfg.guidance_scale)
            for table in tables:
                self._check_token_kept(table, token_prompts)
            vectors = [table.injected.vector for table in tables]
            starts = [v.detach().clone() for v in vectors]
            prompt_rows = [i for i, _ in pairs]
            batches = NoisedBatches(pipe, latents, ctx.generator(1))
            optimizer = torch.optim.Adam(vectors, lr=cfg.learning_rate)
            checkpoints = sorted({cfg.steps * (k + 1) // cfg.tries for k in range(cfg.tries)})
            tries: list[dict[str, Any]] = [{"name": "plain prompt", "step": 0, "accuracy": ctx.plain_accuracy()}]
            start_images = ctx.images(view, token_prompts, "embedding start")
            if cfg.init is not None:
                hits = ctx.hits(start_images)
                tries.append({"name": f"start ({cfg.init!r})", "step": 0, "accuracy": 100.0 * sum(hits) / len(hits)})
            last_images = start_images
            losses: list[float] = []
            denoiser = denoiser_of(pipe)
            device = denoiser.device
            with tqdm(total=cfg.steps, desc="embedding attack", unit="step", disable=not ctx.progress,
                      leave=False) as bar:
                for step in range(1, cfg.steps + 1):
                    rows, noisy, timesteps, target = batches.sample(cfg.train_batch_size)
                    cond = differentiable_encode(conditioner, [token_prompts[prompt_rows[r]] for r in rows.tolist()])
                    prediction = conditioner.predict(denoiser, noisy.to(device), timesteps.to(device), cond)
                    loss = F.mse_loss(prediction.float(), target.to(device))
                    # gradients of the embeddings only: nothing accumulates in the (frozen) denoiser's .grad
                    grads = torch.autograd.grad(loss, vectors)
                    for vector, grad in zip(vectors, grads):
                        vector.grad = grad
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    bar.update(1)
                    if step in checkpoints:
                        last_images = ctx.images(view, token_prompts, f"embedding step {step}")
                        hits = ctx.hits(last_images)
                        tries.append({"name": f"step {step}", "step": step,
                                      "accuracy": 100.0 * sum(hits) / len(hits)})
        finally:
            for table in tables:
                table.injected.remove()
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
                "text_encoders": [table.encoder_attr for table in tables],
                # how far each table's learnt row moved from its start, relative to the start's norm
                "embedding_shift": {table.encoder_attr: float((v.detach() - s).norm() / s.norm().clamp(min=1e-12))
                                    for table, v, s in zip(tables, vectors, starts)},
                # mean absolute pixel change of the token prompts' images, learnt embedding against its start
                "image_change": float((last_images - start_images).abs().mean()),
            },
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def _inverted_text_encoders(self) -> list[_Table]:
        """Copies of every text encoder and tokenizer with the new token, each with its trainable row."""
        pipe, cfg = self.context.pipe, self.config
        start_words = cfg.init if cfg.init is not None else self.context.concept
        tables = []
        for tokenizer_attr, encoder_attr in self.encoder_pairs():
            tokenizer = copy.deepcopy(getattr(pipe, tokenizer_attr))
            text_encoder = copy.deepcopy(getattr(pipe, encoder_attr)).requires_grad_(False)
            start_ids = tokenizer(start_words, add_special_tokens=False).input_ids
            if not start_ids:
                raise ValueError(f"attack 'embedding': {start_words!r} has no tokens to start from in the "
                                 f"pipeline's {tokenizer_attr}")
            tokenizer.add_tokens([cfg.token])
            token_id = tokenizer.convert_tokens_to_ids(cfg.token)
            embedding = text_encoder.get_input_embeddings()
            if token_id >= embedding.num_embeddings:  # T5's table has spare rows; CLIP's grows by one
                with torch.random.fork_rng(devices=[]):  # the new row's random init must not move the global RNG
                    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
                embedding = text_encoder.get_input_embeddings()
            with torch.no_grad():
                start = embedding.weight[torch.tensor(start_ids, device=embedding.weight.device)].float().mean(dim=0)
                embedding.weight[token_id] = start.to(embedding.weight.dtype)
            # T5 prompts are padded to the pipeline's max_sequence_length, CLIP's to the tokenizer's length
            is_t5 = "T5" in type(text_encoder).__name__
            max_length = conditioner_for(pipe).max_sequence_length if is_t5 else int(tokenizer.model_max_length)
            tables.append(_Table(tokenizer_attr, encoder_attr, tokenizer, text_encoder,
                                 _InjectedToken(embedding, token_id, start), max_length))
        return tables

    def _check_token_kept(self, table: _Table, prompts: list[str]) -> None:
        ids = table.tokenizer(prompts, padding="max_length", max_length=table.max_length, truncation=True).input_ids
        missing = [p for p, row in zip(prompts, ids) if table.injected.token_id not in row]
        if missing:
            raise ValueError(f"attack 'embedding': the new token is cut off in {missing[0]!r} (the pipeline's "
                             f"{table.tokenizer_attr} keeps {table.max_length} tokens): use shorter plain_templates")

