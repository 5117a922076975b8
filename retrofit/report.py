"""The diagnose report as a file: its name, reading it back, and how it shows a fraction.

Shared by :mod:`retrofit.diagnose` (which writes it), its page and the model card (which quotes it), so
that a card can be written - and a model shared - without importing the code that measures and draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import RetrofitError, first_line

REPORT_NAME = "diagnose.json"


def read_report(report: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    """A diagnose report given as a dict, a diagnose.json file or the folder that holds one."""
    if isinstance(report, Mapping):
        return report
    path = Path(report)
    path = path / REPORT_NAME if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RetrofitError(
            f"cannot read the diagnose report {path} ({first_line(e, 80)}): pass the --out folder or the "
            f"{REPORT_NAME} of `retrofit diagnose MODEL --compare ORIGINAL`."
        ) from e


def percent(fraction: float) -> str:
    """How reports show a fraction of tokens (the terminal table, the page, the model card)."""
    return f"{100 * fraction:.2f}%"
