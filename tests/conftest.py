"""Shared test fixtures: tiny timm ViTs and made-up images, no downloads."""

import contextlib
import resource
import signal
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def perturb_(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Move every weight off its init so token / position-embedding bugs cannot hide behind zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread beats two that contend for a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG) as they would on a full disk; SIGXFSZ is ignored meanwhile."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
