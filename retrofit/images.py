"""Reading images from disk and turning them into normalised tensors, shared by training and evaluation.

Every reader decodes through :func:`decode_rgb`: an image that cannot be used raises
:class:`UnreadableImage` with a short ``kind``, and unusual but usable files (CMYK, 16-bit, a
misleading suffix) are converted to 8-bit RGB and named, so that training, ``diagnose`` and ``eval``
skip and count the same things and :class:`ImageLog` reports them the same way.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2

from .errors import RetrofitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm's default when a pretrained_cfg names none
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = {".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",), ".webp": ("WEBP",),
           ".bmp": ("BMP",), ".tif": ("TIFF",), ".tiff": ("TIFF",)}  # what PIL finds inside each suffix
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # greyscale modes PIL opens 16-bit files in
SHOWN_KEYS = 5  # skipped images named in a report


class UnreadableImage(RetrofitError):
    """An image that cannot be used; ``kind`` says why in a few words (reports count images by kind)."""

    def __init__(self, message: str, kind: str = "unreadable") -> None:
        super().__init__(message)
        self.kind = kind


def list_images(root: str | Path) -> list[Path]:
    """Every image file below ``root`` (recursive, case-insensitive suffixes), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise RetrofitError(f"image folder {root} does not exist: pass a directory of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RetrofitError(f"no images in {root}: expected files ending in {', '.join(IMAGE_SUFFIXES)}.")
    return files


def _is_empty(source: str | Path | IO[bytes]) -> bool:
    if isinstance(source, (str, Path)):
        return os.path.getsize(source) == 0
    empty = not source.read(1)
    source.seek(0)
    return empty


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB, and the conversion worth reporting: 16-bit greyscale is scaled down, not clipped at 255."""
    if im.mode in SIXTEEN_BIT:
        levels = np.asarray(im, dtype=np.float32) * (255 / 65535)
        return Image.fromarray(levels.clip(0, 255).round().astype(np.uint8)).convert("RGB"), "16-bit"
    return im.convert("RGB"), "CMYK" if im.mode == "CMYK" else None


def decode_rgb(source: str | Path | IO[bytes]) -> tuple[Image.Image, str | None]:
    """Decode an image fully as 8-bit RGB; also name what was converted (``CMYK``, ``16-bit``, ``wrong suffix``).

    A file that cannot be used raises :class:`UnreadableImage` whose ``kind`` is ``missing``, ``empty
    file``, ``not an image``, ``too large`` (PIL's decompression-bomb limit) or ``corrupt or truncated``.
    """
    try:
        if _is_empty(source):
            raise UnreadableImage(f"image {source} is an empty file: remove or replace it.", "empty file")
        with Image.open(source) as im:
            rgb, note = _to_rgb(im)
            suffix = Path(source).suffix.lower() if isinstance(source, (str, Path)) else ""
            wrong_suffix = im.format not in FORMATS.get(suffix, (im.format,))
    except UnreadableImage:
        raise
    except FileNotFoundError as e:
        raise UnreadableImage(f"image {source} does not exist: check the path.", "missing") from e
    except UnidentifiedImageError as e:
        raise UnreadableImage(f"{source} is not an image: remove or replace the file.", "not an image") from e
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"image {source} is too large to decode safely: resize it.", "too large") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what PIL raises on broken image data
        raise UnreadableImage(
            f"cannot read image {source} ({type(e).__name__}): remove or replace the file.", "corrupt or truncated"
        ) from e
    return rgb, note or ("wrong suffix" if wrong_suffix else None)


def decode_cell(value: Any) -> tuple[Image.Image, str | None]:
    """A Hugging Face image cell (undecoded ``{bytes, path}``, a path or a PIL image) as :func:`decode_rgb` does."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return decode_rgb(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, Path)):
        return decode_rgb(value)
    if isinstance(value, Image.Image):
        return _to_rgb(value)
    raise UnreadableImage(f"image cell of type {type(value).__name__} is neither an image nor a path.",
                          "not an image")


def undecoded(dataset: datasets.Dataset | datasets.IterableDataset,
              column: str) -> datasets.Dataset | datasets.IterableDataset:
    """Image bytes without HF decoding them, so that a corrupt image fails in :func:`decode_cell`, per row."""
    feature = (dataset.features or {}).get(column)
    return dataset.cast_column(column, datasets.Image(decode=False)) if isinstance(feature, datasets.Image) else dataset


def open_rgb(source: str | Path | IO[bytes]) -> Image.Image:
    """Decode an image fully as 8-bit RGB; a file that cannot be used raises :class:`UnreadableImage`."""
    return decode_rgb(source)[0]


def _counts(kinds: Iterable[str]) -> str:
    """``"3 empty file, 1 not an image"``: most common first, ties alphabetical (the same whatever the order seen)."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(kinds).items(), key=lambda kv: (-kv[1], kv[0])))


class ImageLog:
    """Images skipped (key -> kind) and unusual ones read anyway (key -> note), each counted once however often read."""

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}
        self.converted: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.skipped)

    def kinds(self) -> str:
        """How many images were skipped for each reason, most common first: ``"3 empty file, 1 not an image"``."""
        return _counts(self.skipped.values())

    def add(self, skipped: Iterable[tuple[str, str]] = (), converted: Iterable[tuple[str, str]] = ()) -> None:
        self.skipped.update(skipped)
        self.converted.update(converted)

    def summary(self) -> str | None:
        """One line with the counts of each kind and the first skipped keys, or None when nothing happened."""
        parts = []
        if self.skipped:
            shown = ", ".join(sorted(self.skipped)[:SHOWN_KEYS]) + (", ..." if len(self) > SHOWN_KEYS else "")
            parts.append(f"skipped {len(self)} unusable image(s): {self.kinds()} ({shown})")
        if self.converted:
            notes = _counts(self.converted.values())
            parts.append(f"read {len(self.converted)} unusual image(s) as 8-bit RGB: {notes}")
        if not parts:
            return None
        return "; ".join(parts) + (". Remove or replace the skipped ones." if self.skipped else ".")


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
    """A (N, 3, H, W) batch of the given files, normalised for ``model``; any unreadable file is an error."""
    tf = eval_transform(size, **data_config(model))
    return torch.stack([tf(open_rgb(p)) for p in paths])


def load_readable(
    paths: Sequence[Path], size: int | Sequence[int], model: nn.Module, limit: int, root: Path, log: ImageLog
) -> tuple[torch.Tensor, list[Path]]:
    """The first ``limit`` readable files as a normalised batch, and their paths; the others go to ``log``.

    Keys in ``log`` are paths relative to ``root``. Raises when none of ``paths`` is readable.
    """
    tf, images, used = eval_transform(size, **data_config(model)), [], []
    for path in paths:
        if len(used) == limit:
            break
        try:
            image, note = decode_rgb(path)
        except UnreadableImage as e:
            log.add(skipped=[(path.relative_to(root).as_posix(), e.kind)])
            continue
        log.add(converted=[(path.relative_to(root).as_posix(), note)] if note else [])
        images.append(tf(image))
        used.append(path)
    if not images:
        raise RetrofitError(f"none of the {len(paths)} images in {root} could be read ({log.kinds()}): "
                            "remove or replace them.")
    return torch.stack(images), used
