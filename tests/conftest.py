"""Shared test fixtures: tiny timm ViTs and made-up images, no downloads."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread beats two that contend for a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeHub:
    """The Hugging Face Hub at the network boundary: HfApi's create_repo / upload_folder.

    Records each repo created and each upload (file name -> bytes); ``fail`` makes create_repo raise it.
    """

    def __init__(self) -> None:
        self.created: list[str] = []
        self.uploads: list[dict] = []
        self.fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        if self.fail is not None:
            raise self.fail
        self.created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path
        from types import SimpleNamespace

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append({"repo_id": repo_id, "folder_path": Path(folder_path), "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import HfApi

    hub = FakeHub()
    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(HfApi, name, getattr(hub, name))  # bound to the fake: every HfApi calls it
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return hub
