"""``TrainingConfig``: how a trained request is optimised (steps, learning rate, LoRA rank, batch, precision).

Its own module, importing no engine: ``engine/request.py`` validates it when a request is built, ``engine/trainer.py`` reads it
when the request trains, and plan files check their training fields against it before torch is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .._validation import MAX_RANK, check_count, check_number, check_optional_number


@dataclass
class TrainingConfig:
    """How one request is optimised.

    Args:
        steps: optimizer steps, at most ``MAX_STEPS`` (1,000,000; batch_size and gradient_accumulation_steps too).
        learning_rate: AdamW learning rate of the adapter parameters.
        batch_size: (x_t, t) samples per step.
        rank: LoRA rank, or "full" (min(in, out) per layer). Ignored when a regularizer needs a dense delta.
        lora_alpha: LoRA alpha (default: the rank, i.e. scale 1).
        max_grad_norm: gradient clipping after the regularizers' transforms (None: no clipping).
        init_lora_weights: peft's LoRA init; False gives a non-zero adapter from the start (tests).
        mixed_precision: "no", "fp16" or "bf16": autocast for the UNet passes (adapter parameters stay float32).
        gradient_accumulation_steps: micro-batches of ``batch_size`` per optimizer step.
        gradient_checkpointing: recompute UNet activations in backward (less memory, more time).

    Raises:
        ValueError: a count that is not a positive integer (or above its maximum), a learning rate, ``lora_alpha``
            or ``max_grad_norm`` that is not a positive number, an unknown ``mixed_precision``.

    Examples:
        >>> TrainingConfig(steps=50, rank=8).to_dict()["steps"]
        50
        >>> TrainingConfig(rank=0)
        Traceback (most recent call last):
        ValueError: rank must be an integer >= 1, got 0
    """

    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 1
    rank: int | Literal["full"] = 4
    lora_alpha: float | None = None
    max_grad_norm: float | None = 1.0
    init_lora_weights: bool | str = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "gradient_accumulation_steps"):
            check_count(getattr(self, name), name)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.rank != "full":
            check_count(self.rank, "rank", maximum=MAX_RANK)
        check_number(self.learning_rate, "learning_rate", minimum=0, exclusive_minimum=True)
        for name in ("lora_alpha", "max_grad_norm"):
            check_optional_number(getattr(self, name), name, minimum=0, exclusive_minimum=True)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (the ledger record's ``training`` field).

        Returns:
            Every field by name, JSON-serialisable.
        """
        return dataclasses.asdict(self)


__all__ = ["TrainingConfig"]
