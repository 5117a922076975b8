"""Linear-probe semantic segmentation on frozen patch features, scored as mIoU.

What a dense-feature user cares about: can a single linear map read classes off each patch? The
head is a 1x1 linear layer on the final patch features; its logits are upsampled bilinearly to
pixels and trained with cross-entropy against the full-resolution mask (as DINOv2's linear
evaluation does), so masks never get downsampled and mIoU is measured on pixels (255 = ignore).
Features are computed once per run and kept on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import JaccardIndex

from ..errors import RetrofitError
from ..features import inference, patch_features, square_size
from ..progress import track
from .datasets import EvalDataset, batches, mask_dataset

IGNORE = 255


def _encode(
    model: nn.Module, data: EvalDataset, size: int, num_classes: int, batch_size: int, progress: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (N, H/p, W/p, D) float32 and masks (N, size, size) int16 (a quarter of int64), on the CPU."""
    feats, masks = [], []
    for keys, images, targets in batches(data, model, size, batch_size, progress):
        with inference(model):
            feats.append(patch_features(model, images).float().cpu())
        for key, mask in zip(keys, targets, strict=True):
            bad = mask[(mask != IGNORE) & ((mask < 0) | (mask >= num_classes))]
            if len(bad):
                raise RetrofitError(
                    f"mask of {key} has class {int(bad[0])} but num_classes={num_classes}: "
                    f"raise num_classes or mark unlabelled pixels {IGNORE}."
                )
        masks.extend(targets)
    return torch.cat(feats), torch.stack([m.as_subclass(torch.Tensor) for m in masks]).to(torch.int16)


def _logits(head: nn.Linear, feats: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, size, size) class logits: the 1x1 head on every patch, upsampled bilinearly to pixels."""
    return F.interpolate(head(feats).permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)


def _train_head(
    feats: torch.Tensor, masks: torch.Tensor, num_classes: int, epochs: int, lr: float, batch_size: int, seed: int,
    progress: bool = False,
) -> tuple[nn.Linear, float]:
    """Fit the linear head with AdamW and cross-entropy; returns it and the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(feats.shape[-1], num_classes)
    with torch.no_grad():  # seeded init, so a run is repeatable whatever the global RNG holds
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    loss_sum = 0.0
    for _ in track(range(epochs), "training the linear head (epochs)", enabled=progress):
        loss_sum = 0.0
        for idx in torch.randperm(len(feats), generator=generator).split(batch_size):
            logits = _logits(head, feats[idx], masks.shape[-1])
            loss = F.cross_entropy(logits, masks[idx].long(), ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
    return head, loss_sum / len(feats)


def _scores(head: nn.Linear, feats: torch.Tensor, masks: torch.Tensor, num_classes: int, batch_size: int) -> dict:
    """mIoU over the classes present in prediction or ground truth, per-class IoU (None if absent), accuracy."""
    metric = JaccardIndex(task="multiclass", num_classes=num_classes, ignore_index=IGNORE, average="none")
    with torch.no_grad():
        for idx in torch.arange(len(feats)).split(batch_size):
            metric.update(_logits(head, feats[idx], masks.shape[-1]).argmax(1), masks[idx].long())
    ious, confmat = metric.compute(), metric.confmat
    present = (confmat.sum(0) + confmat.sum(1)) > 0
    return {
        "miou": float(ious[present].mean()),
        "per_class_iou": [float(v) if p else None for v, p in zip(ious, present, strict=True)],
        "accuracy": float(confmat.diag().sum() / confmat.sum().clamp(min=1)),
    }


def evaluate_probe(
    model: nn.Module,
    train: EvalDataset | str | Path,
    val: EvalDataset | str | Path,
    num_classes: int,
    epochs: int = 10,
    lr: float = 1e-3,
    img_size: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a linear segmentation head on ``train``'s frozen features; mIoU on ``val``.

    ``train`` and ``val`` are :func:`mask_dataset` objects or specs it opens with its defaults.
    Images and masks are resized and centre-cropped to ``img_size`` (default: the model's), masks
    with nearest-neighbour. Features are standardised with the training set's per-channel mean and
    std (an affine map a linear head could absorb; it only speeds up optimisation). The model runs
    in eval mode and is handed back in its own mode. Returns ``miou``, ``per_class_iou`` (None for
    classes in neither prediction nor ground truth), ``accuracy`` (pixel), ``train_loss``,
    ``n_train``, ``n_val`` and ``unreadable`` (samples left out of either set, details in their ``log``).
    """
    if num_classes < 2 or epochs < 1 or lr <= 0:
        raise RetrofitError(
            f"need num_classes >= 2, epochs >= 1 and lr > 0, got {num_classes}, {epochs}, {lr}: fix the arguments."
        )
    size = square_size(model, img_size)
    sets = [d if isinstance(d, EvalDataset) else mask_dataset(d) for d in (train, val)]
    (train_x, train_y), (val_x, val_y) = (
        _encode(model, d, size, num_classes, batch_size, f"features ({name})" if progress else None)
        for d, name in zip(sets, ("train", "val"), strict=True)
    )
    mean, std = train_x.mean((0, 1, 2)), train_x.std((0, 1, 2)).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head, loss = _train_head(train_x, train_y, num_classes, epochs, lr, batch_size, seed, progress)
    return {
        **_scores(head, val_x, val_y, num_classes, batch_size),
        "train_loss": loss,
        "n_train": len(train_x),
        "n_val": len(val_x),
        "unreadable": sum(len(d.log) for d in sets),
    }
