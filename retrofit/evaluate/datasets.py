"""Evaluation data: images with boxes (LOST) or masks (linear probe), from folders or Hugging Face datasets.

Samples are read on demand as ``(key, RGB image, target)`` where the target is a torchvision
``BoundingBoxes`` (XYXY) or ``Mask`` in the image's own pixels. :func:`batches` sends image and target
through the backbone's ``eval_transform`` together, so resize and centre-crop move boxes and masks
exactly as they move the pixels (one geometry, torchvision's).

Folder layouts:
- boxes: an image folder plus a JSON ``{"relative/path.jpg": [[x0, y0, x1, y1], ...]}`` (default
  ``<folder>/boxes.json``);
- masks: an ``images/`` and a ``masks/`` folder whose files share relative paths up to the suffix
  (``images/a/1.jpg`` <-> ``masks/a/1.png``), masks single-channel class indices, 255 = ignore.

Hugging Face data: a folder written by ``save_to_disk``, or anything ``datasets.load_dataset`` opens
(hub names, a local ``imagefolder`` with ``metadata.jsonl``). The image column holds images; for boxes,
``boxes_column`` holds per row a list of ``[4]`` boxes and may be a dotted path into a struct, the
HF detection layout ``objects: {bbox: [[...], ...], category: [...]}`` being ``"objects.bbox"``;
for masks, ``mask_column`` holds single-channel images (in an imagefolder: ``mask_file_name``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import box_convert

from ..errors import RetrofitError
from ..hf import is_saved_dataset, open_split
from ..images import (
    IMAGE_SUFFIXES,
    ImageLog,
    UnreadableImage,
    data_config,
    decode_cell,
    eval_transform,
    list_images,
    open_rgb,
    undecoded,
)
from ..progress import track

BoxFormat = Literal["xyxy", "xywh"]
Target = tv_tensors.BoundingBoxes | tv_tensors.Mask
Sample = tuple[str, Image.Image, Target]
BOXES_FILE = "boxes.json"
IMAGES_DIR, MASKS_DIR = "images", "masks"


class EvalDataset(Sequence[Sample]):
    """Samples read only when indexed, so a large evaluation set never sits in memory at once.

    :func:`batches` skips samples whose image or mask cannot be read and records them in ``log``.
    """

    def __init__(self, keys: Sequence[str], read: Callable[[int], tuple[Image.Image, Target]]) -> None:
        self.keys = list(keys)
        self._read = read
        self.log = ImageLog()

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        key = self.keys[i]  # raises IndexError past the end, which ends iteration
        return (key, *self._read(i))


def box_dataset(
    spec: str | Path,
    boxes: str | Path | None = None,
    box_format: BoxFormat = "xyxy",
    split: str | None = None,
    image_column: str = "image",
    boxes_column: str = "objects.bbox",
) -> EvalDataset:
    """Images with ground-truth boxes: an image folder + boxes JSON, or a Hugging Face dataset.

    ``box_format`` says how the stored numbers read: ``"xyxy"`` (VOC: corners) or ``"xywh"``
    (COCO: top-left corner, width, height). A folder is read with a JSON when ``boxes`` is given or
    ``<spec>/boxes.json`` exists; anything else is opened as a Hugging Face dataset.
    """
    if box_format not in ("xyxy", "xywh"):
        raise RetrofitError(f"box_format must be 'xyxy' (VOC corners) or 'xywh' (COCO), got {box_format!r}.")
    if boxes is None and Path(spec, BOXES_FILE).is_file():
        boxes = Path(spec, BOXES_FILE)
    if boxes is not None:
        return _folder_boxes(Path(spec), Path(boxes), box_format)
    if _unlabelled(spec):
        raise RetrofitError(f"{spec} holds images but no boxes: pass --boxes FILE (boxes= in Python) with a JSON "
                            f'{{"relative/path.jpg": [[x0, y0, x1, y1], ...]}}, or save that file as '
                            f"{Path(spec, BOXES_FILE)}.")
    return _hf_dataset(spec, split, image_column, boxes_column, "boxes_column",
                       lambda raw, image, where: _boxes(raw, box_format, image, where))


def mask_dataset(
    spec: str | Path,
    masks: str | Path | None = None,
    split: str | None = None,
    image_column: str = "image",
    mask_column: str = "mask",
) -> EvalDataset:
    """Images with segmentation masks: paired image and mask folders, or a Hugging Face dataset.

    With ``masks`` the pair is (``spec``, ``masks``); a ``spec`` holding ``images/`` and ``masks/``
    is read the same way; anything else is opened as a Hugging Face dataset.
    """
    if masks is None and Path(spec, IMAGES_DIR).is_dir() and Path(spec, MASKS_DIR).is_dir():
        spec, masks = Path(spec, IMAGES_DIR), Path(spec, MASKS_DIR)
    if masks is not None:
        return _folder_masks(Path(spec), Path(masks))
    if _unlabelled(spec):
        raise RetrofitError(f"{spec} holds images but no masks: put the images in {Path(spec, IMAGES_DIR)} and "
                            f"their masks in {Path(spec, MASKS_DIR)} (same relative paths), or pass masks= in Python.")
    return _hf_dataset(spec, split, image_column, mask_column, "mask_column", _mask)


def _unlabelled(spec: str | Path) -> bool:
    """A folder of images without the metadata file a Hugging Face image folder keeps its annotations in: nothing
    there says where the objects are (opening it as a dataset found a lone image column)."""
    root = Path(spec)
    if not root.is_dir() or is_saved_dataset(root) or any(root.rglob("metadata.*")):
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*"))


def batches(
    dataset: EvalDataset,
    model: nn.Module,
    img_size: int,
    batch_size: int = 16,
    progress: str | None = None,
) -> Iterator[tuple[list[str], torch.Tensor, list[Target]]]:
    """(keys, images on the model's device and dtype, targets in crop pixels), ``batch_size`` at a time.

    Unreadable samples are left out and counted in ``dataset.log``, as training does; a dataset with
    none readable is an error. ``progress`` is a description to show a rich progress bar under, or None.
    """
    if batch_size < 1:
        raise RetrofitError(f"batch_size must be >= 1, got {batch_size}.")
    if len(dataset) == 0:
        raise RetrofitError("the evaluation dataset is empty: pass a folder or split with images in it.")
    tf = eval_transform(img_size, **data_config(model))
    ref = next(model.parameters())
    steps = range(0, len(dataset), batch_size)
    readable = 0
    for start in track(steps, progress or "", enabled=progress is not None):
        samples = [s for i in range(start, min(start + batch_size, len(dataset))) if (s := _sample(dataset, i))]
        if not samples:
            continue
        readable += len(samples)
        pairs = [tf(image, target) for _, image, target in samples]
        images = torch.stack([x for x, _ in pairs]).to(device=ref.device, dtype=ref.dtype)
        yield [key for key, _, _ in samples], images, [t for _, t in pairs]
    if not readable:
        raise RetrofitError(f"none of the {len(dataset)} evaluation images could be read ({dataset.log.kinds()}): "
                            "remove or replace them.")


def _sample(dataset: EvalDataset, i: int) -> Sample | None:
    try:
        return dataset[i]
    except UnreadableImage as e:
        dataset.log.add(skipped=[(dataset.keys[i], e.kind)])
        return None


def _folder_boxes(root: Path, boxes_file: Path, box_format: BoxFormat) -> EvalDataset:
    table = _read_boxes_json(boxes_file)
    missing = [k for k in table if not (root / k).is_file()]
    if missing:
        raise RetrofitError(
            f"{len(missing)} images named in {boxes_file} are not in {root} (first: {missing[0]}): "
            "keys must be image paths relative to the image folder."
        )
    keys = sorted(table)

    def read(i: int) -> tuple[Image.Image, Target]:
        image = open_rgb(root / keys[i])
        return image, _boxes(table[keys[i]], box_format, image, keys[i])

    return EvalDataset(keys, read)


def _read_boxes_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RetrofitError(
            f"boxes file {path} does not exist: pass a JSON of {{\"relative/path.jpg\": [[x0, y0, x1, y1], ...]}}."
        )
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetrofitError(f"boxes file {path} is not readable JSON ({type(e).__name__}): fix or rewrite it.") from e
    if not isinstance(table, dict) or not table:
        raise RetrofitError(
            f"boxes file {path} must be a non-empty object {{\"relative/path.jpg\": [[x0, y0, x1, y1], ...]}}."
        )
    return table


def _boxes(raw: Any, box_format: BoxFormat, image: Image.Image, where: str) -> tv_tensors.BoundingBoxes:
    """Validated XYXY boxes in the image's pixels; a malformed entry is a one-line error naming it."""
    try:
        t: torch.Tensor | None = torch.as_tensor(raw, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        t = None  # reported below like any other malformed entry
    if t is not None and t.numel() == 0:
        t = t.reshape(0, 4)  # an image without objects
    if t is None or t.ndim != 2 or t.shape[1] != 4:
        raise RetrofitError(f"boxes of {where} are not a list of [4] numbers ({raw!r:.60}): fix the annotation.")
    if box_format == "xywh":
        t = box_convert(t, "xywh", "xyxy")
    if not torch.isfinite(t).all() or (t[:, 2:] <= t[:, :2]).any():
        raise RetrofitError(
            f"boxes of {where} have empty or inverted boxes ({t.tolist()!s:.60}): "
            f"check box_format (now {box_format!r}; 'xyxy' = corners, 'xywh' = COCO)."
        )
    return tv_tensors.BoundingBoxes(t, format="XYXY", canvas_size=(image.height, image.width))


def _folder_masks(images_root: Path, masks_root: Path) -> EvalDataset:
    masks = {p.relative_to(masks_root).with_suffix("").as_posix(): p for p in list_images(masks_root)}
    images = list_images(images_root)
    keys = [p.relative_to(images_root).as_posix() for p in images]
    missing = [k for k in keys if Path(k).with_suffix("").as_posix() not in masks]
    if missing:
        raise RetrofitError(
            f"{len(missing)} images in {images_root} have no mask in {masks_root} (first: {missing[0]}): "
            "masks must share the images' relative paths (any image suffix, e.g. a.jpg -> a.png)."
        )

    def read(i: int) -> tuple[Image.Image, Target]:
        image = open_rgb(images[i])
        path = masks[Path(keys[i]).with_suffix("").as_posix()]
        try:
            with Image.open(path) as m:
                return image, _mask(m, image, str(path))
        except OSError as e:
            raise UnreadableImage(f"cannot read mask {path} ({type(e).__name__}): remove or replace the file.",
                                  "unreadable mask") from e

    return EvalDataset(keys, read)


def _mask(raw: Any, image: Image.Image, where: str) -> tv_tensors.Mask:
    """Class-index mask the size of its image (palette or greyscale PNGs read as indices)."""
    m = np.asarray(raw)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise RetrofitError(
            f"mask {where} is not single-channel class indices (shape {m.shape}, {m.dtype}): "
            "save masks as 'L' or 'P' PNGs whose pixel values are class ids (255 = ignore)."
        )
    if m.shape != (image.height, image.width):
        raise RetrofitError(
            f"mask {where} is {m.shape[1]}x{m.shape[0]} but its image is {image.width}x{image.height}: "
            "masks must have the same size as their images."
        )
    return tv_tensors.Mask(torch.from_numpy(m.astype(np.int64)))


def _hf_dataset(
    spec: str | Path,
    split: str | None,
    image_column: str,
    target_column: str,
    target_option: str,
    to_target: Callable[[Any, Image.Image, str], Target],
) -> EvalDataset:
    """Rows of a Hugging Face dataset as samples; ``target_column`` (the setting ``target_option``) may be
    dotted into a struct column."""
    columns = {"image_column": image_column, target_option: target_column.split(".")[0]}
    ds = undecoded(open_split(spec, split, columns=columns), image_column)

    def read(i: int) -> tuple[Image.Image, Target]:
        row = ds[i]
        image = _hf_image(row[image_column], image_column)
        return image, to_target(_dig(row, target_column), image, f"row {i} of {spec}")

    return EvalDataset([f"{split or 'row'}/{i}" for i in range(len(ds))], read)


def _dig(row: dict[str, Any], dotted: str) -> Any:
    """``row["objects"]["bbox"]`` for ``"objects.bbox"``: boxes often live inside a struct column."""
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise RetrofitError(f"column {dotted!r} has no field {part!r}: name the right boxes_column / mask_column.")
        value = value[part]
    return value


def _hf_image(value: Any, column: str) -> Image.Image:
    if not isinstance(value, (dict, Image.Image)):  # an Image column's cells are PIL images or {bytes, path}
        raise RetrofitError(
            f"column {column!r} holds {type(value).__name__}, not images: cast it with datasets.Image() "
            "or name the image column with image_column."
        )
    return decode_cell(value)[0]
