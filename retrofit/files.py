"""Atomic file writes: a reader (or a crash) never sees a half-written cache entry, report or image."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Write through ``write(tmp_path)`` to a unique temporary sibling, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(data: Any, path: str | Path) -> Path:
    """JSON replaced whole or not at all."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
