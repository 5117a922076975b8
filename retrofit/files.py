"""Atomic file writes: a reader (or a crash) never sees a half-written cache entry, report, image or export.

What lands is readable as a plain write would have made it: files ``0o666`` and folders ``0o777`` less
the user's umask (``tempfile`` alone gives 0600 / 0700, which hides models from others on a shared server).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask (reading it means setting it: meanwhile the strictest, then straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain write would have given."""
    mask, path = umask(), Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_atomic(path: str | Path, write: Callable[[str], object], replace: bool = True) -> Path:
    """Write through ``write(tmp_path)`` to a unique temporary sibling, then move it onto ``path``.

    With ``replace=False`` an existing ``path`` is kept and ``FileExistsError`` raised: of several
    processes writing the same file, the first one wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        apply_umask(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _link(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link(tmp: str, path: Path) -> None:
    """Create ``path`` from ``tmp`` only if it does not exist yet (a hard link is atomic at that)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a small race remains)
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def write_json(data: Any, path: str | Path) -> Path:
    """JSON replaced whole or not at all."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))
