"""Reading images from disk and turning them into normalised tensors, shared by training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2

from .errors import RetrofitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's default when a pretrained_cfg names none
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(root: str | Path) -> list[Path]:
    """Every image file below ``root`` (recursive, case-insensitive suffixes), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise RetrofitError(f"image folder {root} does not exist: pass a directory of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RetrofitError(f"no images in {root}: expected files ending in {', '.join(IMAGE_SUFFIXES)}.")
    return files


def open_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """Decode an image fully as RGB; a missing, truncated or non-image file raises ``RetrofitError``."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RetrofitError(f"cannot read image {path} ({type(e).__name__}): remove or replace the file.") from e


def data_config(model: nn.Module) -> dict[str, Any]:
    """Mean, std and interpolation of the backbone, from its timm ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }


TENSOR_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact")  # what resize does on tensors


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """torchvision's mode for a timm ``pretrained_cfg['interpolation']`` name."""
    if name not in TENSOR_INTERPOLATIONS:
        raise RetrofitError(f"unknown interpolation {name!r}: use {', '.join(TENSOR_INTERPOLATIONS)}.")
    return v2.InterpolationMode(name)


def eval_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> v2.Compose:
    """Resize the short side and centre-crop to ``size``, then normalise: the deterministic view of an image."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(min(size), interpolation=interpolation_mode(interpolation), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ])


def load_images(
    paths: Sequence[str | Path], size: int | Sequence[int], model: nn.Module
) -> torch.Tensor:
    """A (N, 3, H, W) batch of the given files, normalised for ``model``."""
    tf = eval_transform(size, **data_config(model))
    return torch.stack([tf(open_rgb(p)) for p in paths])
