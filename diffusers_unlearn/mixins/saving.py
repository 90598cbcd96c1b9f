"""``SavingMixin``: save and publish an unlearned pipeline: the ledger folder, diffusers-format LoRAs, the complete
folded pipeline folder with its model card, and a Hub push."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..publishing.export import diffusers_class_name, export_lora, guess_base_model, save_pretrained_folded, save_unlearned
from ..publishing.hub import check_repo_id, push_folder
from ..engine.ledger import LedgerError, check_adapter_fits, read_ledger_dir, write_ledger_dir
from ..kv.merging import strategy_from_dict
from ..publishing.model_card import build_model_card
from ..engine.state import one_thread, rebuild, unlearning_state


class SavingMixin:
    """Saving and publishing for a pipeline with unlearning state (see ``RequestStreamMixin``).

    Two kinds of output: the ledger folder (``save_unlearning``: the requests only, to load back onto the same base)
    and a complete diffusers folder (``save_unlearned``: folded weights that plain diffusers loads, with the ledger,
    per-request LoRAs and the model card), which ``push_to_hub`` uploads.
    """

    @one_thread
    def save_unlearning(self, directory: str | os.PathLike) -> None:
        """Write the ledger and one adapter per request, so that the requests can be loaded back onto the same base.

        Atomic: adapter files are named by their content and ``ledger.json`` is switched in by one rename, so an
        interrupted save leaves the old ledger or the new one, each with all its files.

        Args:
            directory: the ledger folder (``ledger.json`` and ``adapters/``); created if missing.

        Raises:
            LedgerError: a value that would not load back (nothing is written then).
            OSError: the folder cannot be written.
        """
        state = unlearning_state(self)
        write_ledger_dir(directory, state.ledger, state.artifacts)

    @one_thread
    def load_unlearning(self, directory: str | os.PathLike, replace: bool = False) -> list[str]:
        """Load a saved ledger and its adapters onto this pipeline, which must have the same base weights.

        Everything is checked before anything changes (fingerprint, checksums, shapes, finite values); on any
        failure the pipeline is as it was.

        Args:
            directory: a folder ``save_unlearning`` wrote (or the ``unlearning/`` folder of a saved pipeline).
            replace: swap the requests this pipeline already holds for the loaded ones (without it, a pipeline
                that holds requests refuses).

        Returns:
            The loaded request ids, in order.

        Raises:
            LedgerError: a ledger made on another base (naming both fingerprints), a corrupted or tampered file,
                or mixed composition strategies.
            ValueError: the pipeline holds requests and ``replace`` is False.
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
        """Write one request's adapter in diffusers' LoRA format, relative to the BASE model.

        Plain diffusers' ``load_lora_weights(directory, weight_name=...)`` on the base pipeline then reproduces that
        request alone. A masked dense delta is written as an exact LoRA (one 0/1 selection factor).

        Args:
            request_id: the request to export, e.g. ``"r0002"``.
            directory: where to write the file; created if missing.
            weight_name: the file name (default ``<request_id>.safetensors``): a plain name ending in
                ``.safetensors``.

        Returns:
            A ``LoraExport``: the path, ranks and size of the file.

        Raises:
            UnknownRequestError: the ledger holds no such request.
            ValueError: a ``weight_name`` that is not a plain ``.safetensors`` file name.
        """
        return export_lora(self, request_id, directory, weight_name)

    @one_thread
    def save_unlearned(
        self, directory: str | os.PathLike, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None
    ) -> Any:
        """Write a complete diffusers pipeline folder, deployable without this package.

        The folder holds the folded weights, ``unlearning/`` (ledger, adapters, base K/V weights, diffusers-format
        LoRAs) and the model card ``README.md``. Plain ``DiffusionPipeline.from_pretrained`` loads it; with this
        package it comes back with its ledger. It is written beside ``directory`` and switched in by one atomic
        exchange. The pipeline's mode is unchanged afterwards.

        Args:
            directory: the output folder; an existing one is replaced only when it is empty or an unlearned folder.
            base_model: Hub id of the model before unlearning, for the card (default: the id it was loaded from).
            evaluation: overall evaluation figures for the card (per-request figures come from the ledger).

        Returns:
            The folder's path.

        Raises:
            ValueError: ``directory`` is a file, or a folder of other files (never deleted), or an invalid
                ``base_model``.
            OSError: the folder cannot be written (the previous folder is left as it was).
        """
        return save_unlearned(self, directory, base_model=base_model, evaluation=evaluation)

    def unlearned_model_card(self, *, base_model: str | None = None, evaluation: dict[str, Any] | None = None) -> Any:
        """The model card ``save_unlearned`` writes, without the LoRA file table: to read or edit before a push.

        Args:
            base_model: Hub id of the model before unlearning (default: the id it was loaded from).
            evaluation: overall evaluation figures for the card (per-request figures come from the ledger).

        Returns:
            A ``huggingface_hub.ModelCard``; ``card.data.removed_concepts`` lists the removed concepts.
        """
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
        """Save the unlearned pipeline (as ``save_unlearned``) and upload it to the Hub in one commit.

        The repo is created if missing. Files under ``unlearning/`` that the repo holds but the folder does not
        (adapters of rolled-back requests) are deleted in the same commit; other files of the repo are left alone.

        Args:
            repo_id: the Hub model id, ``"user/model"``.
            commit_message: the commit's message (default: "Upload unlearned pipeline (diffusers-unlearn)").
            private: create the repo as private (None: the Hub's default); an existing repo is not changed.
            token: the Hub token (None: the logged-in one); only handed to ``huggingface_hub``, never printed.
            create_pr: open a pull request instead of committing to the main branch.
            base_model: Hub id of the model before unlearning, for the card.
            evaluation: overall evaluation figures for the card.

        Returns:
            ``huggingface_hub.CommitInfo`` of the commit.

        Raises:
            ValueError: an invalid ``repo_id``.
            TypeError: a ``repo_id`` that is not a string.
        """
        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="diffusers-unlearn-push-") as tmp:
            folder = self.save_unlearned(os.path.join(tmp, "pipeline"), base_model=base_model, evaluation=evaluation)
            return push_folder(folder, repo_id, private=private, token=token, create_pr=create_pr,
                               commit_message=commit_message)

    @one_thread
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, made safe for plain diffusers.

        Stacked requests are folded for the save (a UNet saved with peft wrappers loads with random K/V weights)
        and ``model_index.json`` names the diffusers class. Writes no ledger: ``save_unlearned`` writes the
        complete, restorable folder.

        Args:
            save_directory: the output folder.
            *args: passed to diffusers' ``save_pretrained``.
            **kwargs: passed to diffusers' ``save_pretrained`` (``safe_serialization``, ``push_to_hub``, ...).

        Raises:
            ValueError: called inside ``audit()``, which holds a partial set of requests.
        """
        save_pretrained_folded(
            self, save_directory, lambda: super(SavingMixin, self).save_pretrained(save_directory, *args, **kwargs)
        )
