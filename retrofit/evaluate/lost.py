"""LOST object discovery and its CorLoc score (Simeoni et al., 2021).

LOST needs no labels: in the last block's attention keys, background patches resemble many other
patches while an object's patches resemble few, so the patch with the fewest positive key
correlations seeds the object. High-norm artifact tokens break exactly this (DINOv2: 35.3 CorLoc
on VOC07, 55.4 with registers; docs/method.md), which is why retrofit reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchvision.ops import box_iou

from ..attention import last_block_qk
from ..errors import RetrofitError
from ..features import grid_size, patch_size, square_size
from .datasets import EvalDataset, batches, box_dataset

Box = tuple[float, float, float, float]
HIT_IOU = 0.5


def _patch_keys(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention keys of the patch tokens, heads concatenated: (B, H/p, W/p, heads * head_dim)."""
    gh, gw = grid_size(model, *images.shape[-2:])
    _, k = last_block_qk(model, images)
    return k[:, :, model.num_prefix_tokens:].transpose(1, 2).flatten(2).reshape(len(images), gh, gw, -1)


def lost_box_from_keys(keys: torch.Tensor, patch: tuple[int, int], k: int = 100) -> Box:
    """LOST on one (H, W, D) key grid: the box, in pixels, of the seed's connected foreground."""
    gh, gw = keys.shape[:2]
    feats = keys.reshape(gh * gw, -1).float()
    sim = feats @ feats.T
    order = torch.argsort((sim > 0).sum(1), stable=True)  # fewest positive correlations first
    seed = int(order[0])
    potentials = order[:k]
    expanded = potentials[sim[seed, potentials] > 0]  # always holds the seed itself
    foreground = (sim[expanded].sum(0) > 0).reshape(gh, gw).cpu().numpy()
    components, _ = ndimage.label(foreground)
    rows, cols = np.nonzero(components == components[divmod(seed, gw)])
    ph, pw = patch
    return (float(cols.min() * pw), float(rows.min() * ph), float((cols.max() + 1) * pw), float((rows.max() + 1) * ph))


def lost_box(model: nn.Module, image: torch.Tensor, k: int = 100) -> Box:
    """(x0, y0, x1, y1) in pixels of ``image``, a normalised (3, H, W) tensor (e.g. from ``eval_transform``).

    ``k`` is the seed-expansion size (the paper's 100). The model runs in eval mode, then gets its own back.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise RetrofitError(f"lost_box takes one (3, H, W) image tensor, got shape {tuple(image.shape)}.")
    return lost_box_from_keys(_patch_keys(model, image[None])[0], patch_size(model), k)


def best_iou(box: Box, ground_truth: torch.Tensor) -> float:
    """IoU of ``box`` with the closest of the (N, 4) XYXY ground-truth boxes (0 for none)."""
    if len(ground_truth) == 0:
        return 0.0
    return float(box_iou(torch.tensor([box]), ground_truth.reshape(-1, 4).float()).max())


def corloc(boxes: Sequence[Box], ground_truth: Sequence[torch.Tensor]) -> float:
    """Fraction of images whose box has IoU >= 0.5 with any of that image's ground-truth boxes."""
    if len(boxes) != len(ground_truth) or not boxes:
        raise RetrofitError(
            f"corloc needs one predicted box per image and at least one image, got {len(boxes)} boxes "
            f"for {len(ground_truth)} images."
        )
    return sum(best_iou(b, gt) >= HIT_IOU for b, gt in zip(boxes, ground_truth, strict=True)) / len(boxes)


def evaluate_lost(
    model: nn.Module,
    dataset: EvalDataset | str | Path,
    img_size: int | None = None,
    k: int = 100,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """CorLoc of LOST boxes on images with ground-truth boxes, scored in the centre-crop frame.

    ``dataset`` is an :func:`box_dataset` or a spec it opens with its defaults. Images are resized
    and centre-cropped to ``img_size`` (default: the model's) with their boxes; an image whose boxes
    all fall outside the crop cannot be scored and is counted in ``skipped``; an unreadable one is left
    out and counted in ``unreadable`` (details in ``dataset.log``). Returns ``corloc``, ``n`` (scored
    images), ``skipped``, ``unreadable`` and ``per_image`` entries ``{key, box, iou, hit}``.
    """
    data = dataset if isinstance(dataset, EvalDataset) else box_dataset(dataset)
    size = square_size(model, img_size)
    per_image, skipped = [], 0
    for keys, images, targets in batches(data, model, size, batch_size, "LOST" if progress else None):
        for key, grid, gt in zip(keys, _patch_keys(model, images), targets, strict=True):
            gt = gt[(gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])]  # boxes the crop left some area of
            if len(gt) == 0:
                skipped += 1
                continue
            box = lost_box_from_keys(grid, patch_size(model), k)
            iou = best_iou(box, gt)
            per_image.append({"key": key, "box": list(box), "iou": iou, "hit": iou >= HIT_IOU})
    if not per_image:
        raise RetrofitError(
            f"none of the {skipped} images has a ground-truth box inside the {size}px centre crop: "
            "check the boxes and box_format."
        )
    return {
        "corloc": sum(p["hit"] for p in per_image) / len(per_image),
        "n": len(per_image),
        "skipped": skipped,
        "unreadable": len(data.log),
        "per_image": per_image,
    }
