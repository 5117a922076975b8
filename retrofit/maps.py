"""Norm, CLS-attention and PCA maps of patch features, and the matplotlib figures that show them.

These are the first thing a user looks at: artifacts are the bright dots of the norm map, the
spots that steal the class token's attention, and the odd-coloured patches of the PCA image.
Figures use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from .errors import RetrofitError
from .features import forward_tokens, grid_size, patch_features
from .files import write_atomic
from .images import data_config
from .metrics import outlier_cuts, quantile, token_norms
from .surgery import check_supported, has_class_token

ATTENTION_CLASSES: tuple[type[nn.Module], ...] = (Attention, AttentionRope, EvaAttention)
NO_CLS_NOTE = "no class token, so no CLS attention"


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block, then the model's own train/eval mode back.

    Diagnostics of a model in training must not see dropout or drop-path, nor change its mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _last_attention(model: nn.Module) -> nn.Module:
    check_supported(model)
    attn = model.blocks[-1].attn
    if not isinstance(attn, ATTENTION_CLASSES):
        names = ", ".join(c.__name__ for c in ATTENTION_CLASSES)
        raise RetrofitError(
            f"attention maps need the last block's attention to be one of {names}, "
            f"got {type(attn).__name__}: use norm and PCA maps for this model."
        )
    return attn


def _attention_input(model: nn.Module, attn: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """What the last attention layer receives in an ordinary forward (its tokens and Eva's rope, if any),
    and the forward's final tokens."""
    captured: dict[str, Tensor | None] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["x"] = args[0] if args else kwargs["x"]
        captured["rope"] = args[1] if len(args) > 1 else kwargs.get("rope")

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tokens = forward_tokens(model, images)
    finally:
        handle.remove()
    return captured["x"], captured["rope"], tokens


def _project_qk(attn: nn.Module, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
    """Queries and keys exactly as the attention layer forms them before its softmax."""
    b, n, _ = x.shape
    heads = attn.num_heads
    if attn.qkv is not None:
        qkv = attn.qkv(x)
        if getattr(attn, "q_bias", None) is not None:  # Eva keeps the qkv bias out of the fused projection
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, n, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, -1, q.shape[-1]).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:  # rotary embedding on patch tokens only, as timm's Eva / rope attention does
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (
            torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half).type_as(t)], dim=2)
            for t in (q, k)
        )
    return q, k.repeat_interleave(heads // k.shape[1], dim=1)  # grouped-query attention shares key heads


def last_block_qk(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys of the last block, each (B, heads, N, head_dim) over all N tokens, prefix first.

    Computed from the block's own projections on the input it receives in an ordinary forward
    (captured by a forward pre-hook, so timm's fused attention is left alone), with qk-norm and
    Eva's rotary embedding applied as the block applies them. Runs in eval mode without gradients.
    LOST uses the keys; the CLS attention is ``softmax(scale * q_cls @ k.T)``.
    """
    q, k, _ = _forward_with_qk(model, images)
    return q, k


def _forward_with_qk(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward: the last block's queries and keys, and the final tokens."""
    attn = _last_attention(model)
    with inference(model):
        x, rope, tokens = _attention_input(model, attn, images.to(model_device(model)))
        q, k = _project_qk(attn, x, rope)
    return q, k, tokens


def _cls_probs(model: nn.Module, q: Tensor, k: Tensor, grid: tuple[int, int]) -> Tensor:
    probs = (q[:, :, :1] * _last_attention(model).scale @ k.transpose(-2, -1)).softmax(dim=-1)
    return probs[:, :, 0, model.num_prefix_tokens:].reshape(q.shape[0], q.shape[1], *grid)


def cls_attention(model: nn.Module, images: Tensor) -> Tensor:
    """Last-block attention of the class token to every patch, (B, heads, H, W) probabilities.

    Registers take part of the class token's attention, so a row sums to less than 1 with them.
    """
    if not has_class_token(model):
        raise RetrofitError(f"this model has {NO_CLS_NOTE}: use norm or PCA maps instead.")
    q, k, _ = _forward_with_qk(model, images)
    return _cls_probs(model, q, k, grid_size(model, *images.shape[-2:]))


def pca_rgb(grid: Tensor) -> Tensor:
    """First three principal components of each image's patch features as RGB in [0, 1], (B, H, W, 3).

    Fitted per image, so no batch composition changes a picture. Each component's sign is set so
    its skew is positive and its 1st..99th percentile range is stretched to [0, 1].
    """
    b, h, w, _ = grid.shape
    x = grid.float().flatten(1, 2)
    x = x - x.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    proj = F.pad(u[..., :3] * s[:, None, :3], (0, max(0, 3 - s.shape[-1])))
    proj = proj * torch.where(proj.pow(3).sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    lo, hi = quantile(proj, 0.01, dim=1)[:, None], quantile(proj, 0.99, dim=1)[:, None]
    return ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1).reshape(b, h, w, 3)


@dataclass
class ImageMaps:
    """Everything the figures show for one model on one image, on the patch grid (CPU tensors)."""

    norms: Tensor
    """(H, W) L2 norm of the final patch tokens."""
    outliers: Tensor
    """(H, W) bool: high-norm outliers by :func:`retrofit.metrics.outlier_mask`."""
    cut: float
    """The norm above which a token is a high-norm outlier in this image."""
    pca: Tensor
    """(H, W, 3) first three principal components as RGB."""
    attention: Tensor | None
    """(heads, H, W) last-block CLS attention; None when the model has no class token."""


def compute_maps(model: nn.Module, images: Tensor, k: float = 3.0, threshold: float | None = None) -> list[ImageMaps]:
    """Maps of the final patch features of ``images`` (B, 3, H, W), one :class:`ImageMaps` per image."""
    images = images.to(model_device(model))
    grid = grid_size(model, *images.shape[-2:])
    if has_class_token(model):  # one forward gives both the features and the attention
        queries, keys, tokens = _forward_with_qk(model, images)
        features = tokens[:, model.num_prefix_tokens:].reshape(len(images), *grid, -1)
        attention = _cls_probs(model, queries, keys, grid).cpu()
    else:
        with inference(model):
            features = patch_features(model, images)
        attention = None
    norms, pca = token_norms(features).cpu(), pca_rgb(features)
    cuts, _ = outlier_cuts(norms.flatten(1), k, threshold)
    outliers = norms > cuts[..., None]
    return [
        ImageMaps(norms[i], outliers[i], cuts[i].item(), pca[i].cpu(), None if attention is None else attention[i])
        for i in range(len(images))
    ]


def display_rgb(images: Tensor, model: nn.Module) -> Tensor:
    """Normalised model inputs (B, 3, H, W) back to viewable RGB in [0, 1], (B, H, W, 3)."""
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"], device=images.device)[:, None, None]
    std = torch.tensor(cfg["std"], device=images.device)[:, None, None]
    return (images.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


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


def plot_heads(rows: Sequence[MapRow]) -> Figure | None:
    """CLS attention of every head, one row per model that has a class token (None when none has)."""
    rows = [row for row in rows if row[2].attention is not None]
    if not rows:
        return None
    heads = max(len(maps.attention) for _, _, maps in rows)
    fig = Figure(figsize=(1.8 * heads + 0.4, 2.1 * len(rows)))
    axes = fig.subplots(len(rows), heads, squeeze=False, gridspec_kw=_spacing(len(rows), 2.1))
    for (label, _, maps), row_axes in zip(rows, axes, strict=True):
        row_axes[0].set_ylabel(label, fontsize=9)
        for h, ax in enumerate(row_axes):
            _hide_ticks(ax)
            if h < len(maps.attention):
                ax.imshow(maps.attention[h].numpy(), cmap="viridis")
                ax.set_title(f"head {h}", fontsize=8)
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
