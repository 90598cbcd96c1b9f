"""Publishing: dry runs list exactly the saved files, a push is one commit of exactly those files (checked against
the huggingface_hub client with its network calls intercepted), tokens never appear in output or files."""

from __future__ import annotations

import hashlib

import pytest
from conftest import FAST
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, RepoUrl

import diffusers_unlearn as du
from diffusers_unlearn.cli import main
from diffusers_unlearn.publishing.export import saved_files
from diffusers_unlearn.publishing.hub import plan_push, push_folder

SECRET = "hf_SECRETtokenDoNotLeak1234567890"
STALE = ["unlearning/adapters/r0009.safetensors", "unlearning/lora/r0009.safetensors"]


class FakeHub:
    """Stands in for the Hub behind HfApi: records every call, reads every uploaded file at commit time."""

    def __init__(self, existing: list[str] | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.existing = existing or [".gitattributes"]
        self.uploaded: dict[str, bytes] = {}
        self.deleted: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

        def list_repo_files(api, repo_id, **kwargs):
            hub.calls.append(("list_repo_files", {"repo_id": repo_id, **kwargs}))
            return list(hub.existing)

        def create_commit(api, repo_id, operations, **kwargs):
            operations = list(operations)
            hub.calls.append(("create_commit", {"repo_id": repo_id, "operations": operations, **kwargs}))
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    with open(op.path_or_fileobj, "rb") as handle:
                        data = handle.read()
                    assert hashlib.sha256(data).hexdigest() == op.upload_info.sha256.hex()
                    hub.uploaded[op.path_in_repo] = data
                else:
                    assert isinstance(op, CommitOperationDelete)
                    hub.deleted.append(op.path_in_repo)
            pr_url = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message="m",
                              commit_description="", oid="0" * 40, pr_url=pr_url)

        def refuse(*args, **kwargs):
            raise AssertionError("unexpected Hub call")

        for name in ("upload_folder", "upload_file", "preupload_lfs_files", "create_branch", "repo_info"):
            monkeypatch.setattr(HfApi, name, refuse)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = du.attach(du.testing.tiny_pipeline(seed=0))
    pipe.unlearn("van gogh", domain="style", seed=0, **dict(FAST, steps=3))
    pipe.unlearn("dog", domain="object", seed=1, **dict(FAST, steps=3))
    folder = tmp_path_factory.mktemp("hub") / "saved"
    pipe.save_unlearned(folder)
    return pipe, folder


def test_dry_run_lists_exactly_the_saved_files_and_prints_the_card(saved, monkeypatch, capsys):
    _, folder = saved
    hub = FakeHub().install(monkeypatch)
    written = saved_files(folder)  # the folder was new: these are exactly the files save_unlearned wrote
    assert written == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert plan_push(folder, "user/model").files == written

    assert main(["push", str(folder), "--repo-id", "user/model", "--dry-run", "--token", SECRET]) == 0
    out = capsys.readouterr().out
    listed = [line[4:].split("  (")[0] for line in out.splitlines() if line.startswith("  + ")]
    assert listed == written
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.rstrip("\n") in out and "removed_concepts:" in out
    assert SECRET not in out
    assert hub.calls == []  # no network


def test_push_is_one_commit_of_every_file_and_drops_stale_adapters(saved, monkeypatch, capsys):
    _, folder = saved
    hub = FakeHub(existing=[".gitattributes", "README.md", *STALE, "images/sample.png"]).install(monkeypatch)
    info = push_folder(folder, "user/model", private=True, token=SECRET, commit_message="remove two concepts")
    assert hub.names() == ["create_repo", "list_repo_files", "create_commit"]
    repo = hub.calls[0][1]
    assert repo["repo_id"] == "user/model" and repo["exist_ok"] is True and repo["private"] is True
    assert repo["repo_type"] == "model"
    commit = hub.calls[2][1]
    assert commit["repo_id"] == "user/model" and commit["commit_message"] == "remove two concepts"
    assert commit["create_pr"] is False
    assert all(call["token"] == SECRET for _, call in hub.calls)
    assert sorted(hub.uploaded) == saved_files(folder)
    for path, data in hub.uploaded.items():
        assert data == (folder / path).read_bytes(), path
    assert hub.deleted == STALE  # the user's own files outside unlearning/ are left alone
    assert info.commit_url.endswith("0" * 40)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert not any(SECRET.encode() in (folder / p).read_bytes() for p in saved_files(folder))


def test_pipe_push_to_hub_saves_and_pushes_in_one_commit(saved, monkeypatch, capsys):
    pipe, _ = saved
    hub = FakeHub().install(monkeypatch)
    info = pipe.push_to_hub("model", private=False, token=SECRET, create_pr=True, base_model="someone/base")
    assert hub.names() == ["create_repo", "list_repo_files", "create_commit"]
    assert hub.calls[2][1]["repo_id"] == "me/model"  # the namespace the Hub resolved for a bare name
    assert hub.calls[2][1]["create_pr"] is True and info.pr_url.endswith("/discussions/1")
    assert "unlearning/ledger.json" in hub.uploaded and "unet/diffusion_pytorch_model.safetensors" in hub.uploaded
    card = hub.uploaded["README.md"].decode()
    assert "base_model: someone/base" in card and "- van gogh" in card and "- dog" in card
    assert pipe.unlearning_mode == "stacked"
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and all(SECRET.encode() not in data for data in hub.uploaded.values())


def test_cli_push_reports_the_commit_and_never_the_token(saved, monkeypatch, capsys):
    _, folder = saved
    hub = FakeHub().install(monkeypatch)
    assert main(["push", str(folder), "--repo-id", "user/model", "--token", SECRET, "--private"]) == 0
    out = capsys.readouterr()
    assert "pushed" in out.out and "user/model" in out.out and SECRET not in out.out + out.err
    assert hub.calls[0][1]["private"] is True and hub.calls[2][1]["token"] == SECRET

    def failing_commit(api, repo_id, operations, **kwargs):
        raise RuntimeError("403 Forbidden: token lacks write access")

    monkeypatch.setattr(HfApi, "create_commit", failing_commit)
    assert main(["push", str(folder), "--repo-id", "user/model", "--token", SECRET]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "403 Forbidden" in err and "Traceback" not in err and SECRET not in err


@pytest.mark.parametrize("repo_id, match", [("a/b/c", "invalid repo_id"), ("bad id!!", "invalid repo_id"),
                                            ("", "repo_id must be a Hub model id")])
def test_bad_repo_ids_are_refused_before_any_call(saved, monkeypatch, repo_id, match):
    _, folder = saved
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(ValueError, match=match):
        push_folder(folder, repo_id, token=SECRET)
    assert hub.calls == []


def test_only_unlearned_folders_are_pushed(tmp_path, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_folder(tmp_path / "missing", "user/model")
    du.testing.tiny_pipeline(seed=0).save_pretrained(tmp_path / "plain")
    with pytest.raises(du.LedgerError, match="not an unlearned pipeline folder.*README.md"):
        push_folder(tmp_path / "plain", "user/model")
    assert main(["push", str(tmp_path / "plain"), "--repo-id", "user/model", "--dry-run"]) == 2
    assert hub.calls == []
