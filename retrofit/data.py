"""RetrofitDataModule: unlabeled images for self-distillation, from a folder, a HF dataset or a tensor.

Every batch is ``{"image": (B, 3, S + 2mp, S + 2mp) normalised, "key": [B stable names]}``: the student
sees the centre S x S window, the teacher draws its shifted views from the margin of m patches around
it (CONTRIBUTING.md). Unusable images (unreadable, empty, smaller than a patch) never stop a run: they
are replaced by other images of the data set (map-style) or dropped from the stream, counted by kind in
the main process and reported at the end. The loader is resumable mid-epoch: Lightning saves its
position in every checkpoint and a resumed run continues with the very next batch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import RetrofitError, check_settings
from .faults import batches_done
from .features import patch_size as model_patch_size
from .features import square_size
from .hf import IMAGEFOLDER_PREFIX, is_saved_dataset, open_split
from .images import (
    ImageLog,
    UnreadableImage,
    data_config,
    decode_cell,
    decode_rgb,
    interpolation_mode,
    list_images,
    undecoded,
)

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
_TENSOR_SOURCE = "<tensor>"  # set by RetrofitDataModule.from_tensor only
MAX_REPLACEMENTS = 16  # unusable images in a row before a map-style item gives up
STREAM_SHUFFLE_BUFFER = 1000

Item = dict[str, Any]
Decoded = tuple[torch.Tensor, str | None]  # uint8 (or normalised float) pixels, and what was converted


def _item_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, pass, index, ...): independent of workers and the global RNG."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class CropTransform:
    """Resize the short side to ``resize``, crop an (S + 2 margin)-pixel square, normalise.

    ``uint8`` images are pixels and get normalised; float images are taken as already normalised.
    The crop position is drawn from the generator it is given, so it is reproducible per item. An
    image whose short side is below ``min_side`` (one patch) holds no patch of its own and is refused.
    """

    size: int
    margin: int
    resize: int
    random: bool
    interpolation: v2.InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_side: int = 1

    @property
    def crop(self) -> int:
        return self.size + 2 * self.margin

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = image.shape[-2:]
        if min(h, w) < self.min_side:
            raise UnreadableImage(f"image of {w}x{h} px is smaller than one {self.min_side} px patch.",
                                  "smaller than a patch")
        image = TF.resize(image, [self.resize], interpolation=self.interpolation, antialias=True)
        c = self.crop
        if self.random:
            top, left = (int(torch.randint(n - c + 1, (1,), generator=generator)) for n in image.shape[-2:])
            image = image[..., top : top + c, left : left + c]
        else:  # torchvision's own centre crop, so margin 0 equals images.eval_transform
            image = TF.center_crop(image, [c, c])
        if image.dtype == torch.uint8:
            return TF.normalize(TF.to_dtype(image, torch.float32, scale=True), list(self.mean), list(self.std))
        return image.float().contiguous()


class _PathReader:
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __call__(self, index: int) -> Decoded:
        image, note = decode_rgb(self.paths[index])
        return TF.pil_to_tensor(image), note


def _decode(value: Any) -> Decoded:
    """A HF image cell as uint8 pixels."""
    image, note = decode_cell(value)
    return TF.pil_to_tensor(image), note


class _HFReader:
    def __init__(self, dataset: datasets.Dataset, column: str) -> None:
        self.dataset, self.column = dataset, column

    def __call__(self, index: int) -> Decoded:
        return _decode(self.dataset[index][self.column])


class _TensorReader:
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __call__(self, index: int) -> Decoded:
        return self.images[index], None


def _item(key: str, image: torch.Tensor | None, note: str | None, skipped: list[tuple[str, str]]) -> Item:
    return {"image": image, "key": key, "skipped": skipped, "converted": [(key, note)] if note else []}


class ImageDataset(Dataset):
    """Map-style images with stable keys; an unusable image is swapped for a seeded random other one."""

    def __init__(self, keys: Sequence[str], reader: Callable[[int], torch.Tensor], transform: CropTransform,
                 seed: int) -> None:
        self.keys, self.reader, self.transform, self.seed = keys, reader, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Item:
        generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        skipped = []
        for _ in range(MAX_REPLACEMENTS):
            try:
                image, note = self.reader(index)
                image = self.transform(image, generator)
            except UnreadableImage as e:
                skipped.append((self.keys[index], e.kind))
                index = int(torch.randint(len(self), (1,), generator=generator))
                continue
            return _item(self.keys[index], image, note, skipped)
        raise RetrofitError(
            f"{MAX_REPLACEMENTS} images in a row could not be read (e.g. {skipped[0][0]}): "
            "most of the data set is unreadable, check the source."
        )


class StreamDataset(IterableDataset):
    """A streamed HF dataset: unusable images are dropped from the stream and passed on as skipped."""

    def __init__(self, dataset: datasets.IterableDataset, column: str, key_column: str | None, prefix: str,
                 transform: CropTransform, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.column, self.key_column, self.prefix = dataset, column, key_column, prefix
        self.transform, self.seed, self.rank, self.world_size = transform, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stride, offset = self.world_size * workers, self.rank * workers + worker
        skipped: list[tuple[str, str]] = []
        for n, row in enumerate(self.dataset):  # HF splits shards over the loader's workers itself
            index = n * stride + offset  # unique over ranks and workers
            key = self._key(row, index)
            generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
            try:
                image, note = _decode(row[self.column])
                image = self.transform(image, generator)
            except UnreadableImage as e:
                skipped.append((key, e.kind))
                continue
            yield _item(key, image, note, skipped)
            skipped = []
        if skipped:  # a marker, so the trailing unusable images are still counted
            yield _item("", None, None, skipped)

    def _key(self, row: dict[str, Any], index: int) -> str:
        """The id column, else the image's file name if the stream carries one, else its stream position."""
        if self.key_column:
            return str(row[self.key_column])
        cell = row[self.column]
        path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
        return f"{self.prefix}:{path or index}"


def collate(items: list[Item]) -> Item:
    """Stack the usable items; the skipped and converted (key, kind) pairs ride along for the main process."""
    good = [it for it in items if it["image"] is not None]
    return {
        "image": torch.stack([it["image"] for it in good]) if good else None,
        "key": [it["key"] for it in good],
        "skipped": [pair for it in items for pair in it["skipped"]],
        "converted": [pair for it in items for pair in it["converted"]],
    }


def worker_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C, and a SIGTERM sent to their process group, to the main process.

    A terminal's Ctrl-C and ``timeout`` or a batch scheduler signal the whole process group; a worker
    that died of it would turn the main process's clean stop into a "DataLoader worker exited
    unexpectedly" traceback. A SIGTERM from the main process itself (how DataLoader and multiprocessing
    end workers) still ends the worker. Where ``sigwaitinfo`` is missing (macOS) SIGTERM keeps its default.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)  # the default action, in the one thread that lets it through


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler whose next pass can start ``skip`` batches in without reading the skipped images."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: DataLoader iterators call iter() twice and use the second, so read skip lazily.
        skip, self.skip = self.skip, 0
        yield from itertools.islice(super().__iter__(), skip, None)


class SkippingLoader(DataLoader):
    """A DataLoader that moves the skipped keys of each batch into ``log`` in the main process, and resumes.

    Batches arrive with exactly the keys of the batch contract; one that has no usable image left
    (only possible at the end of a stream) is not yielded. Each pass takes its epoch from ``epoch``
    (the trainer's epoch when there is one, else a pass count) and derives the crops and the shuffle
    order from it alone, so epochs differ and the same seed repeats. ``state_dict`` records the epoch
    and ``position()`` (the batches of it the training loop has stepped through); Lightning saves it
    in checkpoints and hands it back on resume, so the resumed pass starts at the next batch - by
    index alone for map-style data, by reading past the done batches for streams. Each pass is added
    to ``open_passes``, so that a stopped run can end it and its workers at once.
    """

    def __init__(self, dataset: Dataset, log: ImageLog, epoch: Callable[[], int | None],
                 position: Callable[[], int], seed: int, open_passes: weakref.WeakSet, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.log, self.epoch, self.position, self.seed = log, epoch, position, seed
        self.open_passes = open_passes
        self.passes = 0
        self.resume: dict[str, int] | None = None

    def _epoch(self) -> int:
        epoch = self.epoch()
        return max(self.passes - 1, 0) if epoch is None else epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": self.position()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = dict(state)

    def __iter__(self) -> Iterator[Item]:
        batches = self._pass()
        self.open_passes.add(batches)
        return batches

    def _pass(self) -> Iterator[Item]:
        self.passes += 1
        epoch, resume, self.resume = self._epoch(), self.resume, None
        skip = resume["batches"] if resume and resume["epoch"] == epoch else 0
        self.dataset.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(_item_seed(self.seed, "order", epoch))
        if isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip, skip = skip, 0
        for n, batch in enumerate(super().__iter__()):
            self.log.add(batch.pop("skipped"), batch.pop("converted"))
            if n >= skip and batch["image"] is not None:
                yield batch


def _nearest_sizes(size: int, patch: int) -> str:
    """The valid sizes either side of ``size``, for the error message."""
    below, above = size // patch * patch, math.ceil(size / patch) * patch
    return " or ".join(str(s) for s in dict.fromkeys((below, above)) if s > 0)


class RetrofitDataModule(L.LightningDataModule):
    """Unlabeled training images, cropped with a teacher margin and normalised.

    Args:
        source: where the images are. A local folder (searched recursively for .jpg .jpeg .png .webp
            .bmp .tif .tiff; keys are paths relative to it), a folder written by HF
            ``Dataset.save_to_disk``, ``imagefolder:DIR`` (HF's imagefolder loader), or ``hf:NAME``
            for a Hugging Face hub dataset. HF keys are ``"<name>:<split>:<index>"`` unless
            ``key_column`` is set.
        img_size: training resolution S of the student's square window; must divide by the patch size. None: the
            backbone's own size, set when training starts.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes; 0 reads in the main process.
        split: dataset split for HF sources (ignored for folders).
        image_column: HF column that holds the images (or file paths).
        key_column: HF column with a stable id per image, used as the key. Streams without it use the
            image's file name when the data carries one, else the position in the (shuffled) stream:
            unique, but not stable across epochs, so set it for streams that feed the target cache.
        streaming: stream the HF dataset (an IterableDataset; split over DDP ranks by shards or examples).
        max_images: use only the first N images (None: all).
        random_crop: random crop position; False gives the deterministic resize + centre crop that the
            target cache needs.
        crop_pct: fraction of the resized short side that the student's S-pixel window spans (timm's
            crop_pct); below 1 the crops show a random part of each image. The short side is never
            resized below the full crop S + 2mp.
        shuffle: reshuffle the order every epoch; False keeps the source order.
        seed: seeds the order and every crop: the same seed gives the same batches.
        mean: normalisation mean; default: the backbone's (its pretrained_cfg), set when training starts.
        std: normalisation std; default: the backbone's, as for mean.
        interpolation: "bicubic", "bilinear", "nearest" or "nearest-exact"; default: the backbone's.
        patch_size: the backbone's patch size p; default: the backbone's, set when training starts.
        margin: margin m in patches around the student's window (real pixels for the teacher's shifted
            views); training sets it to what the targets need.
    """

    def __init__(
        self,
        source: str,
        img_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        split: str = "train",
        image_column: str = "image",
        key_column: str | None = None,
        streaming: bool = False,
        max_images: int | None = None,
        random_crop: bool = True,
        crop_pct: float = 1.0,
        shuffle: bool = True,
        seed: int = 0,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        patch_size: int | None = None,
        margin: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.source, self.img_size, self.batch_size, self.num_workers = source, img_size, batch_size, num_workers
        self.split, self.image_column, self.key_column = split, image_column, key_column
        self.streaming, self.max_images, self.random_crop, self.crop_pct = streaming, max_images, random_crop, crop_pct
        self.shuffle, self.seed, self.margin = shuffle, seed, margin
        self.mean, self.std, self.interpolation, self.patch_size = mean, std, interpolation, patch_size
        self.images = ImageLog()
        self._open_passes: weakref.WeakSet[Iterator[Item]] = weakref.WeakSet()
        self._tensor: torch.Tensor | None = None
        self._reader: Callable[[int], torch.Tensor] | datasets.IterableDataset | None = None
        self._keys: list[str] = []
        self._prefix = ""  # "<name>:<split>" of a stream
        self._check_settings()
        self._check_source()

    @classmethod
    def from_tensor(cls, images: torch.Tensor, **kwargs: Any) -> RetrofitDataModule:
        """Images already in memory, (N, 3, H, W) and normalised for the backbone; keys are ``tensor:<i>``. They are
        read in the main process unless ``num_workers`` says otherwise."""
        if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
                and images.is_floating_point()):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise RetrofitError(f"images must be a float (N, 3, H, W) tensor, got {shape}: normalise and stack them.")
        if len(images) == 0:
            raise RetrofitError("the image tensor is empty: pass at least one image.")
        dm = cls(source=_TENSOR_SOURCE, **{"num_workers": 0, **kwargs})  # in memory: nothing to read in workers
        dm._tensor = images.detach().cpu()
        return dm

    # ---- settings ---------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        mean, std = (None if v is None else list(v) for v in (self.mean, self.std))
        check_settings((
            (self.img_size is None or self.img_size >= 1, f"img_size must be a positive integer, got {self.img_size}"),
            (self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size}"),
            (self.num_workers >= 0 and self.margin >= 0, "num_workers and margin must be >= 0"),
            (self.max_images is None or self.max_images >= 1, f"max_images must be >= 1, got {self.max_images}"),
            (0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}"),
            (mean is None or len(mean) == 3, f"mean needs 3 values (R, G, B), got {mean}"),
            (std is None or len(std) == 3, f"std needs 3 values (R, G, B), got {std}"),
            (std is None or min(std) > 0, f"std must be positive, got {std}"),
        ), "RetrofitDataModule")
        if self.interpolation is not None:
            interpolation_mode(self.interpolation)
        if self.patch_size is not None and self.img_size is not None:
            self._check_img_size(self.patch_size)

    def _check_img_size(self, patch: int) -> None:
        if self.img_size % patch:
            raise RetrofitError(
                f"img_size {self.img_size} is not divisible by the patch size {patch}: "
                f"use {_nearest_sizes(self.img_size, patch)}."
            )


    def _check_source(self) -> None:
        if self.source == _TENSOR_SOURCE or self.source.startswith(HUB_PREFIX):
            return
        path = Path(self.source.removeprefix(IMAGEFOLDER_PREFIX))
        if not path.is_dir():
            raise RetrofitError(
                f"image source {str(path)!r} is not an existing folder: pass a directory of images "
                f"(or {HUB_PREFIX}NAME for a Hugging Face hub dataset)."
            )

    def configure_for(self, model: nn.Module, margin_patches: int | None = None) -> None:
        """Take image size, patch size, mean, std and interpolation from ``model`` (unless set explicitly) and the
        margin.

        The training module calls this in its ``setup``, before any dataloader is built.
        """
        cfg = data_config(model)
        self.img_size = self.hparams.img_size or square_size(model)
        patch_h, patch_w = model_patch_size(model)
        if patch_h != patch_w:
            raise RetrofitError(f"patch size {patch_h}x{patch_w} is not square: retrofit trains square crops only.")
        self.patch_size = self.hparams.patch_size or patch_h
        self.mean = self.hparams.mean or cfg["mean"]
        self.std = self.hparams.std or cfg["std"]
        self.interpolation = self.hparams.interpolation or cfg["interpolation"]
        if margin_patches is not None:
            self.margin = margin_patches
        self._check_settings()

    def transform(self) -> CropTransform:
        """The crop-and-normalise step for the current settings (built late: configure_for may change them)."""
        if self.patch_size is None or self.img_size is None:
            unknown = "patch size" if self.patch_size is None else "image size"
            raise RetrofitError(f"{unknown} unknown: call configure_for(model) first or pass patch_size and img_size.")
        self._check_img_size(self.patch_size)
        margin = self.margin * self.patch_size
        crop = self.img_size + 2 * margin
        defaults = data_config(nn.Identity())  # ImageNet values until configure_for names the backbone's
        return CropTransform(
            size=self.img_size,
            margin=margin,
            resize=max(round(self.img_size / self.crop_pct), crop),
            random=self.random_crop,
            interpolation=interpolation_mode(self.interpolation or defaults["interpolation"]),
            mean=tuple(self.mean or defaults["mean"]),
            std=tuple(self.std or defaults["std"]),
            min_side=self.patch_size,
        )

    # ---- sources ----------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Index the source once: list the folder, or open the HF dataset and check its columns."""
        if self._reader is not None:
            return
        if self._tensor is not None:
            self._keys = [f"tensor:{i}" for i in range(len(self._tensor))][: self.max_images]
            self._reader = _TensorReader(self._tensor)
        elif self.source == _TENSOR_SOURCE:
            raise RetrofitError("no image tensor given: build the data module with RetrofitDataModule.from_tensor.")
        elif self.source.startswith((HUB_PREFIX, IMAGEFOLDER_PREFIX)) or is_saved_dataset(self.source):
            self._setup_hf()
        else:
            root = Path(self.source)
            paths = list_images(root)[: self.max_images]
            self._keys = [p.relative_to(root).as_posix() for p in paths]
            self._reader = _PathReader(paths)

    def _setup_hf(self) -> None:
        dataset, name = self._load_hf()
        dataset = undecoded(dataset.select_columns([c for c in (self.image_column, self.key_column) if c]),
                             self.image_column)
        prefix = f"{name}:{self.split}"
        if self.streaming:
            if isinstance(dataset, datasets.Dataset):
                dataset = dataset.to_iterable_dataset()
            self._reader = dataset.take(self.max_images) if self.max_images else dataset
            self._prefix = prefix
            return
        if len(dataset) == 0:
            raise RetrofitError(f"dataset {name} split {self.split!r} is empty: pick another split or source.")
        dataset = dataset.select(range(min(len(dataset), self.max_images or len(dataset))))
        self._keys = ([str(k) for k in dataset[self.key_column]] if self.key_column
                      else [f"{prefix}:{i}" for i in range(len(dataset))])
        self._reader = _HFReader(dataset, self.image_column)

    def _load_hf(self) -> tuple[datasets.Dataset | datasets.IterableDataset, str]:
        """The split as a HF dataset and a short stable name for keys (hub name or folder name)."""
        spec = self.source.removeprefix(HUB_PREFIX)
        columns = {"image_column": self.image_column, "key_column": self.key_column}
        dataset = open_split(spec, self.split, self.streaming, columns, cli_prefix="--data.")
        name = spec if self.source.startswith(HUB_PREFIX) else Path(spec.removeprefix(IMAGEFOLDER_PREFIX)).name
        return dataset, name

    # ---- loading ----------------------------------------------------------------------------------

    def dataset(self) -> ImageDataset | StreamDataset:
        """The training dataset with the current crop settings."""
        self.setup()
        if isinstance(self._reader, datasets.IterableDataset):
            return self._stream(self._reader)
        return ImageDataset(self._keys, self._reader, self.transform(), self.seed)

    def _stream(self, dataset: datasets.IterableDataset) -> StreamDataset:
        rank, world = _rank_and_world(self.trainer)
        if self.shuffle:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=STREAM_SHUFFLE_BUFFER)
        if world > 1:
            dataset = datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world)
        return StreamDataset(dataset, self.image_column, self.key_column, self._prefix, self.transform(),
                             self.seed, rank, world)

    def train_dataloader(self) -> SkippingLoader:
        """Batches per the contract; with DDP, Lightning swaps in its distributed sampler (map-style)."""
        data = self.dataset()
        if isinstance(data, ImageDataset):
            generator = torch.Generator().manual_seed(self.seed)
            order = RandomSampler(data, generator=generator) if self.shuffle else SequentialSampler(data)
            batching = {"batch_sampler": ResumableBatchSampler(order, self.batch_size), "generator": generator}
        else:
            batching = {"batch_size": self.batch_size}
        return SkippingLoader(
            data,
            self.images,
            epoch=self._trainer_epoch,
            position=self._trainer_position,
            seed=self.seed,
            open_passes=self._open_passes,
            num_workers=self.num_workers,
            collate_fn=collate,
            worker_init_fn=worker_signals,
            persistent_workers=False,  # workers must see each pass's epoch for fresh crops
            **batching,
        )

    def _trainer_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def _trainer_position(self) -> int:
        """Batches of the current epoch the training loop has stepped through (0 outside a Trainer)."""
        return 0 if self.trainer is None else batches_done(self.trainer)

    @property
    def num_skipped(self) -> int:
        """How many distinct unusable images were skipped so far (in this process)."""
        return len(self.images)

    @property
    def skipped(self) -> dict[str, str]:
        """Unusable images so far: key -> kind (``corrupt or truncated``, ``empty file``, ...)."""
        return dict(self.images.skipped)

    def report(self) -> str | None:
        """Log and return the one-line summary of skipped and converted images, or None when there were none."""
        line = self.images.summary()
        if line is not None:
            log.warning(line)
        return line

    def teardown(self, stage: str) -> None:
        self.report()

    def on_exception(self, exception: BaseException) -> None:
        """A stopped run ends its loader passes and their workers now: left to interpreter exit, the
        workers would be terminated mid-batch, with an error from each."""
        for batches in list(self._open_passes):
            batches.close()
        self.report()


def _rank_and_world(trainer: L.Trainer | None) -> tuple[int, int]:
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
