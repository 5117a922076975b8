"""TargetCache: denoised targets computed once per image and stored as fp16 safetensors files.

Entries live under a directory named by a hash of everything that changes them (teacher weights,
target settings, layers, resolution, margin), so changing any of these starts a fresh directory
and stale entries are never read. Each entry is written to a temporary file and renamed into
place; an unreadable or foreign file counts as missing and is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import RetrofitError
from .features import block_indices, grid_size, patch_size
from .files import write_atomic
from .targets import DEFAULT_SETTINGS, DenoisedTargets, Targets, TargetSettings, crop_center

FP16_MAX = torch.finfo(torch.float16).max
Entry = dict[str, Tensor]


def teacher_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's class, architecture and every state-dict tensor (name, shape, dtype, bytes).

    About 0.45 s for ViT-B (346 MB) on one CPU core; computed once per cache.
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(str(getattr(model, "pretrained_cfg", {}).get("architecture")).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _storage(t: Tensor) -> Tensor:
    """fp16 for features (half the disk); float32 only if a value would overflow fp16."""
    t = t.detach()  # cast on the tensor's own device: half the bytes to move to the host
    if t.is_floating_point():
        t = t.half() if t.abs().max() <= FP16_MAX else t.float()
    return t.cpu().contiguous()


class TargetCache:
    """Denoised targets on disk, one file per image key.

    Caching only makes sense when each key always gives the same pixels (a deterministic
    transform: no random crops, flips or colour jitter), since a stored target belongs to those
    pixels; it also freezes one random draw of views per image for the whole training run.
    The teacher fingerprint is taken once, here: a teacher changed afterwards needs a new cache.
    """

    def __init__(
        self,
        root: str | Path,
        teacher: nn.Module,
        settings: TargetSettings = DEFAULT_SETTINGS,
        layers: Sequence[int] = (),
        *,
        image_size: int | tuple[int, int],
        margin: int = 0,
    ) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.grid = grid_size(teacher, *size)
        self.teacher, self.settings, self.margin = teacher, settings, margin
        self.layers = block_indices(teacher, layers)
        info = {
            "teacher": teacher_fingerprint(teacher),
            "settings": settings.key(),
            "layers": list(self.layers),
            "image_size": list(size),
            "margin": margin,
        }
        namespace = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / namespace
        info_file = self.dir / "info.json"
        if not info_file.is_file():  # for people looking at the directory
            text = json.dumps({**info, "settings_fields": asdict(settings)}, indent=2, sort_keys=True)
            write_atomic(info_file, lambda tmp: Path(tmp).write_text(text))

    def path(self, key: str) -> Path:
        """Where the entry for an image key lives (hashed: keys may be paths or any string)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.dir / name[:2] / f"{name}.safetensors"

    def _read(self, key: str) -> Entry | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                entry = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError):  # truncated or corrupt: recompute
            return None
        expected = {"features", "coverage", "outliers", *(f"layer.{i}" for i in self.layers)}
        if set(entry) != expected or tuple(entry["coverage"].shape) != self.grid:
            return None
        return entry

    def _write(self, key: str, entry: Entry) -> None:
        write_atomic(self.path(key), lambda tmp: save_file(entry, tmp, metadata={"key": key}))

    def _entries(self, keys: Sequence[str], targets: Targets) -> list[Entry]:
        if len(keys) != len(targets.features):
            raise RetrofitError(f"got {len(keys)} keys for {len(targets.features)} targets: pass one key per image.")
        if tuple(targets.coverage.shape[1:]) != self.grid or set(targets.layers) != set(self.layers):
            raise RetrofitError(
                f"targets on a {tuple(targets.coverage.shape[1:])} grid with layers {sorted(targets.layers)} do not "
                f"fit this cache ({self.grid}, layers {list(self.layers)}): use a cache made for these settings."
            )
        fields = {"features": targets.features, "coverage": targets.coverage, "outliers": targets.outliers}
        fields.update({f"layer.{i}": t for i, t in targets.layers.items()})
        stored = {name: _storage(t) for name, t in fields.items()}
        return [{name: t[b] for name, t in stored.items()} for b in range(len(keys))]

    def _stack(self, entries: list[Entry], device: torch.device | str | None) -> Targets:
        def stacked(name: str) -> Tensor:
            # float32 before stacking: CPU autocast (bf16-mixed) refuses to stack fp16 tensors
            return torch.stack([e[name].float() if e[name].is_floating_point() else e[name] for e in entries]).to(
                device
            )

        return Targets(
            features=stacked("features"),
            layers={i: stacked(f"layer.{i}") for i in self.layers},
            coverage=stacked("coverage"),
            outliers=stacked("outliers"),
        )

    def get(self, keys: Sequence[str], device: torch.device | str | None = None) -> Targets | None:
        """Stored targets for ``keys`` (float32 features), or None unless every key is present."""
        entries = [self._read(k) for k in keys]
        if any(e is None for e in entries):
            return None
        return self._stack(entries, device)

    def put(self, keys: Sequence[str], targets: Targets) -> None:
        """Store one entry per key (atomic per entry)."""
        for key, entry in zip(keys, self._entries(keys, targets), strict=True):
            self._write(key, entry)

    def get_or_compute(self, denoiser: DenoisedTargets, images: Tensor, keys: Sequence[str]) -> Targets:
        """Targets for a batch, computing (and storing) only the images not in the cache yet.

        ``images`` follow the batch contract: (B, 3, S + 2*m*p, S + 2*m*p) with this cache's size
        and margin. Fresh targets go through the same fp16 rounding as stored ones, so the first
        epoch and later ones train on identical values.
        """
        if denoiser.teacher is not self.teacher or denoiser.settings.key() != self.settings.key() or \
                denoiser.layers != self.layers:
            raise RetrofitError("the DenoisedTargets does not match this cache's teacher, settings or layers: "
                                "build both from the same teacher, settings and layers.")
        center = crop_center(images, self.margin * patch_size(self.teacher)[0])
        if grid_size(self.teacher, *center.shape[-2:]) != self.grid or len(keys) != len(images):
            raise RetrofitError(
                f"a batch of {len(images)} images of size {tuple(images.shape[-2:])} with {len(keys)} keys does "
                f"not fit this cache ({self.grid} grid, margin {self.margin}): pass one key per image at its size."
            )
        entries = [self._read(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            fresh = denoiser(images[missing], self.margin)
            for i, entry in zip(missing, self._entries([keys[i] for i in missing], fresh), strict=True):
                self._write(keys[i], entry)
                entries[i] = entry
        return self._stack(entries, images.device)
