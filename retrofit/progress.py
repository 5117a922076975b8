"""The progress bar for every step a person waits on: diagnose, evaluation, target caches, searches.

One look everywhere (what is running, a bar, done/total, elapsed and remaining time). The bar clears
itself when done and draws nothing when output is not a terminal (logs, CI) or when turned off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a transient rich bar shows how far along they are (``total`` for unsized ones)."""
    if not enabled:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)
