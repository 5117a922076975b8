"""TargetCache: denoised targets computed once per image and stored as fp16 safetensors files.

Entries live under a directory named by a hash of everything that changes them (teacher weights,
target settings, layers, resolution, margin), so changing any of these starts a fresh directory
and stale entries are never read. Each entry records its key, its directory's hash and a checksum
of its tensors; a file that is unreadable (truncated, not safetensors), corrupt (checksum) or foreign
(another key, cache or shape) is recomputed and rewritten, counted in :meth:`TargetCache.report`,
and never stops a run. Entries are published atomically and the first writer wins: processes that
fill one cache at the same time all train on the stored targets, so they agree on every image.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .errors import RetrofitError, first_line
from .features import block_indices, grid_size, patch_size
from .files import write_atomic
from .neurons import RegisterNeurons
from .targets import DEFAULT_SETTINGS, DenoisedTargets, Targets, TargetSettings, crop_center

FP16_MAX = torch.finfo(torch.float16).max
FORMAT = 2  # entry layout (metadata key, cache, checksum); part of the directory hash
PROBLEMS = ("unreadable", "corrupt", "foreign")  # kinds of bad entries, in report order
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


def checksum(entry: Entry) -> str:
    """CRC-32 of an entry's tensors (names, shapes, dtypes, bytes): any flipped bit or short write changes it.

    A corruption check, not a fingerprint: 1-2 ms per ViT-B/14 518 px entry (2.1 MB), read every epoch.
    """
    crc = 0
    for name, tensor in sorted(entry.items()):
        crc = zlib.crc32(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode(), crc)
        crc = zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


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
        neurons: RegisterNeurons | None = None,
    ) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.grid = grid_size(teacher, *size)
        self.teacher, self.settings, self.margin, self.neurons = teacher, settings, margin, neurons
        self.layers = block_indices(teacher, layers)
        info = {
            "teacher": teacher_fingerprint(teacher),
            "settings": settings.key(),
            "layers": list(self.layers),
            "image_size": list(size),
            "margin": margin,
            "neurons": None if neurons is None else {str(b): u for b, u in neurons.units.items()},
            "format": FORMAT,
        }
        self.namespace = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / self.namespace
        self.counts: Counter[str] = Counter()  # read, computed, shared, unstored and each of PROBLEMS
        self.write_error: str | None = None
        info_file = self.dir / "info.json"
        if not info_file.is_file():  # for people looking at the directory
            text = json.dumps({**info, "settings_fields": asdict(settings)}, indent=2, sort_keys=True)
            write_atomic(info_file, lambda tmp: Path(tmp).write_text(text))

    def path(self, key: str) -> Path:
        """Where the entry for an image key lives (hashed: keys may be paths or any string)."""
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.dir / name[:2] / f"{name}.safetensors"

    def _load(self, key: str) -> tuple[Entry | None, str | None]:
        """``(entry, None)``; ``(None, None)`` when there is none; ``(None, kind)`` for a file that cannot be used."""
        path = self.path(key)
        if not path.is_file():
            return None, None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                entry = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError, ValueError):  # cut short, or not a safetensors file at all
            return None, "unreadable"
        if metadata.get("key") != key or metadata.get("cache") != self.namespace or not self._fits(entry):
            return None, "foreign"
        if metadata.get("checksum") != checksum(entry):
            return None, "corrupt"
        return entry, None

    def _fits(self, entry: Entry) -> bool:
        expected = {"features", "coverage", "outliers", *(f"layer.{i}" for i in self.layers)}
        return set(entry) == expected and all(tuple(entry[n].shape[:2]) == self.grid for n in expected)

    def _lookup(self, keys: Sequence[str]) -> tuple[list[Entry | None], set[str]]:
        """Stored entries (None where missing or unusable) and the keys whose files must be replaced."""
        entries, bad = [], set()
        for key in keys:
            entry, problem = self._load(key)
            entries.append(entry)
            if entry is not None:
                self.counts["read"] += 1
            elif problem is not None:
                self.counts[problem] += 1
                bad.add(key)
        return entries, bad

    def _publish(self, key: str, entry: Entry, replace: bool) -> Entry:
        """Store ``entry`` unless another process stored this key first; return what is stored (or ours).

        A failed write (full disk, read-only folder) is counted and reported, never raised: the cache
        only saves time.
        """
        metadata = {"key": key, "cache": self.namespace, "checksum": checksum(entry)}
        try:
            write_atomic(self.path(key), lambda tmp: save_file(entry, tmp, metadata=metadata), replace=replace)
        except FileExistsError:
            stored, _ = self._load(key)
            if stored is not None:
                self.counts["shared"] += 1
                return stored
            return self._publish(key, entry, replace=True)  # what was there cannot be used: replace it
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            self.counts["unstored"] += 1
            self.write_error = self.write_error or first_line(e, 80)
        return entry

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
        """Stored targets for ``keys`` (float32 features), or None unless every key has a usable entry."""
        entries, _ = self._lookup(keys)
        if any(e is None for e in entries):
            return None
        return self._stack(entries, device)

    def put(self, keys: Sequence[str], targets: Targets) -> None:
        """Store one entry per key (atomic per entry, replacing what is there)."""
        for key, entry in zip(keys, self._entries(keys, targets), strict=True):
            self._publish(key, entry, replace=True)

    def report(self) -> str | None:
        """One line on the entries that had to be recomputed or could not be stored; None when all was well."""
        bad = {kind: self.counts[kind] for kind in PROBLEMS if self.counts[kind]}
        parts = []
        if bad:
            kinds = ", ".join(f"{n} {kind}" for kind, n in bad.items())
            parts.append(f"recomputed and rewrote {sum(bad.values())} bad entries ({kinds})")
        if self.counts["unstored"]:
            parts.append(f"could not store {self.counts['unstored']} entries ({self.write_error})")
        if not parts:
            return None
        done = f"{self.counts['read']} read, {self.counts['computed']} computed"
        return f"target cache {self.dir}: {'; '.join(parts)}; {done}."

    def get_or_compute(self, targets: DenoisedTargets, images: Tensor, keys: Sequence[str]) -> Targets:
        """Targets for a batch, computing (and storing) only the images not in the cache yet.

        ``images`` follow the batch contract: (B, 3, S + 2*m*p, S + 2*m*p) with this cache's size
        and margin. Fresh targets go through the same fp16 rounding as stored ones, so the first
        epoch and later ones train on identical values.
        """
        if targets.teacher is not self.teacher or targets.settings.key() != self.settings.key() or \
                targets.layers != self.layers or targets.neurons != self.neurons:
            raise RetrofitError("the DenoisedTargets does not match this cache's teacher, settings, layers or register "
                                "neurons: build both from the same ones.")
        center = crop_center(images, self.margin * patch_size(self.teacher)[0])
        if grid_size(self.teacher, *center.shape[-2:]) != self.grid or len(keys) != len(images):
            raise RetrofitError(
                f"a batch of {len(images)} images of size {tuple(images.shape[-2:])} with {len(keys)} keys does "
                f"not fit this cache ({self.grid} grid, margin {self.margin}): pass one key per image at its size."
            )
        entries, bad = self._lookup(keys)
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            fresh = targets(images[missing], self.margin)
            self.counts["computed"] += len(missing)
            for i, entry in zip(missing, self._entries([keys[i] for i in missing], fresh), strict=True):
                entries[i] = self._publish(keys[i], entry, replace=keys[i] in bad)
        return self._stack(entries, images.device)
