"""index.html of a diagnose folder: the whole report on one page that opens anywhere.

Self-contained: styles inline and every figure embedded as a PNG data URI, no script and no network,
so the single file can be mailed, attached to an issue or kept as a CI artifact. Numbers and figures
come from the report :func:`retrofit.diagnose.diagnose` returns (the same one diagnose.json holds).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .files import write_atomic
from .metrics import REPAIR_KEYS
from .report import percent

PAGE_NAME = "index.html"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0; } .wide { overflow-x: auto; }
th[colspan] { text-align: center; border-bottom: 2px solid #ddd; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { background: #f6f6f6; } td.text, th.text { text-align: left; }
td.bad { color: #b00020; font-weight: 600; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-weight: 600; margin-bottom: .4em; }
details summary { cursor: pointer; color: #555; margin: .4em 0; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; }
"""

_LAYER_COLUMNS = (("median", "median"), ("p99", "p99"), ("max", "max"), ("high", "high-norm"), ("low", "low-norm"))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _cell(text: str, css: str = "") -> str:
    return f'<td class="{css}">{_e(text)}</td>' if css else f"<td>{_e(text)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1, groups: str = "") -> str:
    """A table of ready cells; ``groups`` is an optional header row above the column names."""
    head = "".join(f'<th class="text">{_e(h)}</th>' if i < text_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<div class="wide"><table><thead>{groups}<tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _outlier_cell(fraction: float) -> str:
    return _cell(percent(fraction), "bad" if fraction > 0 else "")


def _models_table(report: Mapping[str, Any]) -> str:
    cosine = report.get("cosine")
    rows = []
    for s in report["models"]:
        leakage = "n/a (1 image)" if s["position_leakage"] is None else f"{s['position_leakage']:.3f}"
        rows.append([_cell(s["label"], "text"), _cell(s["architecture"], "text"), _cell(str(s["num_registers"])),
                     _cell(s["cls_attention"], "text"), _cell(leakage)])
    table = _table(["model", "architecture", "registers", "CLS attention", "position leakage R²"], rows, 2)
    if report.get("models") and len(report["models"]) == 2:
        a, b = (s["label"] for s in report["models"])
        note = ("their patch grids differ" if cosine is None else
                f"mean {cosine['mean']:.3f}, 5th percentile {cosine['p5']:.3f}")
        table += f"<p>Patch cosine between <b>{_e(a)}</b> and <b>{_e(b)}</b> (final features): {_e(note)}.</p>"
    if report.get("repair"):  # scored against an artifact-free reference model
        rows = [[_cell(label, "text"), *(_cell(f"{scores[k]:.3f}") for k in REPAIR_KEYS)]
                for label, scores in report["repair"].items()]
        table += ("<p>Patch cosine to the artifact-free reference model, at the first model's artifacts, their "
                  "8 neighbours and elsewhere:</p>" + _table(["model", *REPAIR_KEYS], rows))
    return table


def _layers_table(report: Mapping[str, Any]) -> str:
    models = report["models"]
    groups = "<tr><th></th>" + "".join(f'<th colspan="{len(_LAYER_COLUMNS)}">{_e(s["label"])}</th>'
                                       for s in models) + "</tr>"
    header = ["layer"] + [name for _ in models for _, name in _LAYER_COLUMNS]
    by_layer: dict[int, list[str]] = {}
    for i, s in enumerate(models):
        for entry in s["layers"]:
            cells = [_cell(f"{entry[k]:.3g}") for k in ("median", "p99", "max")]
            cells += [_outlier_cell(entry["high"]), _outlier_cell(entry["low"])]
            by_layer.setdefault(entry["layer"], [_cell("")] * len(_LAYER_COLUMNS) * i).extend(cells)
    rows = [[_cell(str(layer))] + cells for layer, cells in sorted(by_layer.items())]
    return _table(header, rows, 0, groups)


def _image_rows(report: Mapping[str, Any], name: str) -> list[list[str]]:
    rows = []
    for s in report["models"]:
        stats = next(entry for entry in s["images"] if entry["image"] == name)
        rows.append([_cell(s["label"], "text"), _cell(f"{stats['median_norm']:.3g}"),
                     _cell(f"{stats['max_norm']:.3g}"), _outlier_cell(stats["high"]), _outlier_cell(stats["low"])])
    return rows


def _png(folder: Path, name: str | None, alt: str) -> str:
    if not name or not (folder / name).is_file():
        return ""
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figures(report: Mapping[str, Any], folder: Path) -> str:
    parts = []
    for entry in report.get("figures", []):
        name = entry["image"]
        stats = _table(["model", "median norm", "max norm", "high-norm", "low-norm"], _image_rows(report, name))
        heads = _png(folder, entry.get("heads_png"), f"CLS attention per head, {name}")
        parts.append(
            f'<figure id="{_e(entry["png"])}"><figcaption>{_e(name)}</figcaption>{stats}'
            f"{_png(folder, entry['png'], f'maps of {name}')}"
            + (f"<details><summary>CLS attention of every head</summary>{heads}</details>" if heads else "")
            + "</figure>"
        )
    return "".join(parts)


def render_page(report: Mapping[str, Any], folder: str | Path) -> str:
    """The page's HTML; figures are read from ``folder`` (where diagnose wrote them)."""
    settings = report["settings"]
    size = settings.get("input_size")
    cut = (f"norm above {settings['threshold']:g}" if settings.get("threshold")
           else f"norm above {settings['k']:g}x")
    labels = " vs ".join(s["label"] for s in report["models"])
    count = len(report["images"])
    meta = (f"{count} image{'s' if count > 1 else ''}" + (f" at {size[0]}x{size[1]} px" if size else "")
            + f"; outliers: {cut} or below 1/{settings['k']:g}x the image's median patch-token norm; "
            f"retrofit {version('retrofit')}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>retrofit diagnose: {_e(labels)}</title><style>{STYLE}</style></head>
<body>
<h1>Artifacts of {_e(labels)}</h1>
<p class="meta">{_e(meta)}</p>
<h2>Models</h2>
{_models_table(report)}
<h2>Patch-token norms per layer</h2>
<p>Median, 99th percentile and max of the patch-token norms over all images; the share of high- and low-norm
outlier tokens (artifacts are high-norm).</p>
{_layers_table(report)}
<h2>Maps per image</h2>
<p>Input, patch-token norm (outliers circled), CLS attention of the last block and the first three principal
components of the patch features as RGB; one row per model.</p>
{_figures(report, Path(folder))}
<h2>Settings</h2>
<pre>{_e(json.dumps({**settings, "images": report["images"]}, indent=1))}</pre>
</body></html>
"""


def write_page(report: Mapping[str, Any], folder: str | Path) -> Path:
    """Write ``index.html`` into the diagnose folder (atomically, like every report file)."""
    text = render_page(report, folder)
    return write_atomic(Path(folder) / PAGE_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
