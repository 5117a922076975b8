"""Matplotlib figures of the maps: one row per model (input, norm, CLS attention, PCA) and every head.

Figures use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .attention import NO_CLS_NOTE
from .files import write_atomic
from .maps import ImageMaps

MapRow = tuple[str, Tensor, ImageMaps]
"""One figure row: a label, the (H, W, 3) input image and the maps of one model on it."""


def _spacing(rows: int, row_inches: float) -> dict[str, float]:
    """Fixed margins that leave room for two-line titles (a layout engine costs ~0.5 s a figure)."""
    return {"left": 0.04, "right": 0.97, "bottom": 0.02, "top": 1 - 0.45 / (rows * row_inches),
            "wspace": 0.35, "hspace": 0.5 / row_inches + 0.1}


def _hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _norm_panel(fig: Figure, ax: Axes, maps: ImageMaps, vmax: float) -> None:
    ratio = (maps.norms.max() / maps.norms.median()).item()
    im = ax.imshow(maps.norms.numpy(), cmap="inferno", vmin=0, vmax=vmax)
    ys, xs = np.nonzero(maps.outliers.numpy())
    ax.scatter(xs, ys, s=60, facecolors="none", edgecolors="cyan", linewidths=1.2)
    plural = "" if len(xs) == 1 else "s"
    ax.set_title(f"patch norm: max/median {ratio:.1f}\n{len(xs)} high-norm outlier{plural}", fontsize=9)
    colorbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    colorbar.ax.axhline(maps.cut, color="cyan", linewidth=1.5)  # the outlier cut


def _attention_panel(fig: Figure, ax: Axes, maps: ImageMaps) -> None:
    if maps.attention is None:
        note = NO_CLS_NOTE.replace(", ", ",\n")
        ax.text(0.5, 0.5, note, ha="center", va="center", fontsize=9, transform=ax.transAxes)
        ax.set_title("CLS attention", fontsize=9)
        return
    im = ax.imshow(maps.attention.mean(dim=0).numpy(), cmap="viridis")
    ax.set_title(f"CLS attention, last block\nmean of {len(maps.attention)} heads", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)


def plot_maps(rows: Sequence[MapRow]) -> Figure:
    """One row per (model, image): input, norm map (outliers circled), CLS attention, PCA.

    The norm colour scale is shared by all rows and reaches at least the outlier cut (a cyan line on
    the colour bar), so artifacts that went away look dark instead of being rescaled into view.
    """
    vmax = max(max(maps.norms.max().item(), maps.cut) for _, _, maps in rows)
    fig = Figure(figsize=(12, 3.1 * len(rows)))
    axes = fig.subplots(len(rows), 4, squeeze=False, gridspec_kw=_spacing(len(rows), 3.1))
    for (label, rgb, maps), (ax_img, ax_norm, ax_attn, ax_pca) in zip(rows, axes, strict=True):
        ax_img.imshow(rgb.numpy())
        ax_img.set_ylabel(label, fontsize=10)
        ax_img.set_title("input", fontsize=9)
        _norm_panel(fig, ax_norm, maps, vmax)
        _attention_panel(fig, ax_attn, maps)
        ax_pca.imshow(maps.pca.numpy())
        ax_pca.set_title("PCA of patch features\n(components 1-3 as RGB)", fontsize=9)
        for ax in (ax_img, ax_norm, ax_attn, ax_pca):
            _hide_ticks(ax)
    return fig


HEADS_TITLE = "CLS attention of each head, last block (bright: where the class token looks)"


def plot_heads(rows: Sequence[MapRow]) -> Figure | None:
    """CLS attention of every head, one row per model that has a class token (None when none has).

    The figure is titled, and each row is headed by its model's label above the head titles, laid
    out in inches so that neither is cut off however many heads or rows there are.
    """
    rows = [row for row in rows if row[2].attention is not None]
    if not rows:
        return None
    heads = max(len(maps.attention) for _, _, maps in rows)
    panel, gap, title, edge = 1.6, 0.65, 0.6, 0.2  # inches: a head's map, the band above a row, the title band
    width = max(1.9 * heads, 6.0) + 2 * edge
    height = title + len(rows) * (gap + panel) + edge
    fig = Figure(figsize=(width, height))
    fig.suptitle(HEADS_TITLE, fontsize=10, wrap=True, y=1 - edge / height, va="top")
    axes = fig.subplots(len(rows), heads, squeeze=False, gridspec_kw={
        "left": edge / width, "right": 1 - edge / width, "bottom": edge / height,
        "top": 1 - (title + gap) / height, "hspace": gap / panel, "wspace": 0.15,
    })
    for (label, _, maps), row_axes in zip(rows, axes, strict=True):
        row_axes[0].text(0, 1 + 0.6 * gap / panel, label, transform=row_axes[0].transAxes, fontsize=10,
                         fontweight="bold", ha="left", va="bottom")
        for h, ax in enumerate(row_axes):
            _hide_ticks(ax)
            if h < len(maps.attention):
                ax.imshow(maps.attention[h].numpy(), cmap="viridis")
                ax.set_title(f"head {h}", fontsize=8)
            else:
                ax.set_axis_off()
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array, for loggers that take images."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a PNG through a temporary file and a rename, so a reader never sees half an image."""
    FigureCanvasAgg(fig)
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_residual(models: Sequence[dict], k: float) -> Figure:
    """Outlier share and largest norm over the image median per block of the residual stream, one line per model
    (diagnose's ``models`` entries); the blocks where a model's artifacts build are shaded in its colour."""
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2, gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.16, "top": 0.84, "wspace": 0.25})
    for i, summary in enumerate(models):
        r, colour = summary["residual"], f"C{i}"
        blocks = np.arange(len(r["outliers"]))
        axes[0].plot(blocks, 100 * np.asarray(r["outliers"]), marker="o", color=colour, label=summary["label"])
        axes[1].plot(blocks, r["max_ratio"], marker="o", color=colour, label=summary["label"])
        if r["start"] is not None:
            for ax in axes:
                ax.axvspan(r["start"] - 0.4, r["end"] + 0.4, color=colour, alpha=0.12)
    axes[0].set_title(f"high-norm outliers made per block (> {k:g}x the image median), %", fontsize=9)
    axes[1].set_title("largest patch-token norm / image median", fontsize=9)
    axes[1].axhline(k, color="grey", linewidth=1, linestyle="--")
    for ax in axes:
        ax.set_xlabel("block (raw output, no norm)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Residual stream per block (shaded: where the artifacts build)", fontsize=10)
    return fig
