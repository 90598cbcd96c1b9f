"""``SavingMixin``: save and publish an unlearned pipeline: the ledger folder, diffusers-format LoRAs, the complete
folded pipeline folder with its model card, and a Hub push."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .export import diffusers_class_name, export_lora, guess_base_model, save_pretrained_folded, save_unlearned
from .hub import check_repo_id, push_folder
from .ledger import LedgerError, check_adapter_fits, read_ledger_dir, write_ledger_dir
from .merging import strategy_from_dict
from .model_card import build_model_card
from .state import one_thread, rebuild, unlearning_state


class SavingMixin:
    """Saving and publishing for a pipeline with unlearning state (see ``UnlearningMixin``)."""

    @one_thread
    def save_unlearning(self, directory: str | os.PathLike) -> None:
        """Write the ledger (JSON) and one safetensors adapter per request into ``directory``, atomically."""
        state = unlearning_state(self)
        write_ledger_dir(directory, state.ledger, state.artifacts)

    @one_thread
    def load_unlearning(self, directory: str | os.PathLike, replace: bool = False) -> list[str]:
        """Load a saved ledger and its adapters onto this pipeline (same base weights); return the request ids.

        Everything is checked before anything changes. A pipeline that already holds requests is refused unless
        ``replace=True``.
        """
        state = unlearning_state(self)
        shapes = {name: tuple(w.shape) for name, w in state.base_weights.items()}

        def same_base(ledger: Any) -> None:
            if ledger.base_fingerprint != state.base_fingerprint:
                raise LedgerError(
                    f"{directory} was made on base weights with fingerprint {ledger.base_fingerprint}, but this "
                    f"pipeline's base has fingerprint {state.base_fingerprint}: load it onto the pipeline it was "
                    "trained on"
                )

        ledger, artifacts = read_ledger_dir(directory, shapes, check=same_base)
        strategies = {str(strategy_from_dict(r.strategy)) for r in ledger.requests}
        if len(strategies) > 1:
            raise LedgerError(f"{directory} mixes composition strategies {sorted(strategies)}")
        for record in ledger.requests:
            check_adapter_fits(artifacts[record.request_id], shapes, f"{directory}/{record.adapter['file']}")
        if state.ledger.requests and not replace:
            raise ValueError(
                f"this pipeline already holds requests {state.ledger.ids()}; pass replace=True to swap them for "
                f"the ledger in {directory}"
            )
        previous = (state.ledger, state.artifacts)
        state.ledger, state.artifacts = ledger, artifacts
        try:
            rebuild(self)
        except BaseException:
            state.ledger, state.artifacts = previous
            rebuild(self)
            raise
        return ledger.ids()

    @one_thread
    def export_lora(self, request_id: str, directory: str | os.PathLike, weight_name: str | None = None) -> Any:
        """Write one request's adapter in diffusers' LoRA format (``directory/weight_name``, default
        ``<request_id>.safetensors``); plain diffusers' ``load_lora_weights`` on the base pipeline reproduces that
        request alone. Returns an ``export.LoraExport`` (path, ranks, size)."""
        return export_lora(self, request_id, directory, weight_name)

    @one_thread
    def save_unlearned(
        self, directory: str | os.PathLike, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None
    ) -> Any:
        """Write a complete diffusers pipeline folder: folded weights, ``unlearning/`` (ledger, adapters, base K/V
        weights, diffusers-format LoRAs) and the model card ``README.md``. Plain ``DiffusionPipeline.from_pretrained``
        loads it; with this package it comes back with its ledger. The pipeline's mode is unchanged afterwards.

        Args:
            base_model: Hub id of the model before unlearning, for the card (default: the id it was loaded from).
            evaluation: overall evaluation figures for the card (per-request figures come from the ledger).
        """
        return save_unlearned(self, directory, base_model=base_model, evaluation=evaluation)

    def unlearned_model_card(self, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None) -> Any:
        """The model card ``save_unlearned`` writes (a ``huggingface_hub.ModelCard``), without the LoRA file table."""
        return build_model_card(unlearning_state(self).ledger, base_model=base_model or guess_base_model(self),
                                pipeline_class=diffusers_class_name(self), evaluation=evaluation)

    @one_thread
    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        *,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        base_model: str | None = None,
        evaluation: dict[str, Any] | None = None,
    ) -> Any:
        """Save the unlearned pipeline (as ``save_unlearned``) and upload it in one commit; the repo is created if
        missing. Returns ``huggingface_hub.CommitInfo``. The token is only handed to ``huggingface_hub``."""
        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="diffusers-unlearn-push-") as tmp:
            folder = self.save_unlearned(os.path.join(tmp, "pipeline"), base_model=base_model, evaluation=evaluation)
            return push_folder(folder, repo_id, private=private, token=token, create_pr=create_pr,
                               commit_message=commit_message)

    @one_thread
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, made safe for plain diffusers: stacked requests are folded for the save
        (a UNet saved with peft wrappers loads with random K/V weights) and model_index.json names the diffusers
        class. Writes no ledger: ``save_unlearned`` writes the complete, restorable folder."""
        save_pretrained_folded(
            self, save_directory, lambda: super(SavingMixin, self).save_pretrained(save_directory, *args, **kwargs)
        )
