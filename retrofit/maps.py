"""What the figures show: norm, outlier, CLS-attention and PCA maps of a model's patch features.

These are the first thing a user looks at: artifacts are the bright dots of the norm map, the
spots that steal the class token's attention, and the odd-coloured patches of the PCA image.
:mod:`retrofit.plots` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import cls_probs, forward_with_attention
from .features import grid_size, inference, model_device, patch_features
from .images import data_config
from .metrics import outlier_cuts, quantile, token_norms
from .surgery import has_class_token


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
        seen, tokens = forward_with_attention(model, images, probs=True)
        features = tokens[:, model.num_prefix_tokens:].reshape(len(images), *grid, -1)
        attention = cls_probs(model, seen["probs"], grid).cpu()
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
