"""Publishing a saved unlearned pipeline folder to the Hugging Face Hub in one commit.

The token goes to ``huggingface_hub`` and nowhere else: it is never printed, logged or written into a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._validation import check_repo_id
from ..engine.saved_folder import CARD_FILE, UNLEARNING_DIR, check_unlearned_folder, saved_files


@dataclass
class PushPlan:
    """What a push sends: the repo, the files (paths in the repo) and the card text."""

    repo_id: str
    folder: Path
    files: list[str]
    card: str
    private: bool | None = None
    create_pr: bool = False
    deletes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The dry-run report: repo settings, every file with its size, then the model card."""
        visibility = {None: "Hub default", True: "private", False: "public"}[self.private]
        head = [
            f"repo: {self.repo_id} (model, {visibility}; created if missing)",
            f"commit: {'a pull request' if self.create_pr else 'one commit to main'} adding {len(self.files)} files "
            f"(files under {UNLEARNING_DIR}/ that the repo holds and the folder does not are deleted):",
        ]
        body = [f"  + {path}  ({(self.folder / path).stat().st_size} bytes)" for path in self.files]
        return "\n".join([*head, *body, f"--- {CARD_FILE} ---", self.card.rstrip("\n"), f"--- end of {CARD_FILE} ---"])


def plan_push(
    folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, create_pr: bool = False
) -> PushPlan:
    """Check ``folder`` (written by ``save_unlearned``) and list what a push of it uploads; no network."""
    repo_id = check_repo_id(repo_id)
    folder = Path(folder)
    check_unlearned_folder(folder)
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    return PushPlan(repo_id, folder, saved_files(folder), card, private, bool(create_pr))


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    api: Any = None,
) -> Any:
    """Create the repo if needed and upload the folder in one commit; returns ``huggingface_hub.CommitInfo``.

    Files under ``unlearning/`` that the repo holds but the folder does not (adapters of rolled-back requests) are
    deleted in the same commit, so the Hub copy never lists a request its ledger no longer has.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    plan = plan_push(folder, repo_id, private=private, create_pr=create_pr)
    api = api or HfApi()
    repo_url = api.create_repo(plan.repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    full_id = getattr(repo_url, "repo_id", None) or plan.repo_id
    try:
        existing = api.list_repo_files(full_id, repo_type="model", token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        existing = []
    keep = set(plan.files)
    plan.deletes = sorted(p for p in existing if p.startswith(f"{UNLEARNING_DIR}/") and p not in keep)
    operations: list[Any] = [CommitOperationDelete(path_in_repo=p) for p in plan.deletes]
    operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(plan.folder / p)) for p in plan.files]
    message = commit_message or "Upload unlearned pipeline (diffusers-unlearn)"
    return api.create_commit(
        full_id,
        operations,
        commit_message=message,
        token=token,
        repo_type="model",
        create_pr=bool(create_pr),
    )


__all__ = ["PushPlan", "check_repo_id", "plan_push", "push_folder"]
