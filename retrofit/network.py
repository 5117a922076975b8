"""Whether the Hugging Face Hub can be reached, asked once per process.

Without a route to the Hub, huggingface_hub retries every file five times (about 25 s each) before it
gives up or falls back to its cache. One short request answers the question instead; where it fails,
the downloads run in offline mode: the local cache serves what it holds and anything else fails at once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import huggingface_hub

from .errors import first_line

PROBE_TIMEOUT_S = 5.0


def hub_unreachable() -> str | None:
    """Why the Hub at ``HF_ENDPOINT`` cannot be reached, or None when it answers (or offline mode is on already)."""
    hub = huggingface_hub.constants
    return None if hub.HF_HUB_OFFLINE else _probe(hub.ENDPOINT)


@functools.cache
def _probe(endpoint: str) -> str | None:
    """One HEAD request through huggingface_hub's own client, so proxies and certificates count as they do for
    the downloads; any answer, even an error status, is a route. Asked once per endpoint and process."""
    try:
        huggingface_hub.get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # refused, no DNS, timeout, TLS: the downloads would fail the same way
        return f"cannot reach the Hugging Face Hub at {endpoint} ({first_line(e, 80)})"
    return None


def _offline_flags() -> list:
    """The modules whose ``HF_HUB_OFFLINE`` switches offline mode: huggingface_hub's, and datasets' once imported."""
    return [m for m in (huggingface_hub.constants, sys.modules.get("datasets.config")) if m is not None]


@contextmanager
def hub_or_cache() -> Iterator[str | None]:
    """Inside the block, Hub downloads run in offline mode when the Hub cannot be reached (cached files still
    load); yields why it cannot (None: it can)."""
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    saved = [(module, module.HF_HUB_OFFLINE) for module in _offline_flags()]
    for module, _ in saved:
        module.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        for module, value in saved:
            module.HF_HUB_OFFLINE = value
