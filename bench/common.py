"""What the benchmarks share: models with planted artifacts, batches, the naive PH-Reg loop, timing, memory.

Our side always goes through the engine itself (``RetrofitModule.training_step`` with its
``DenoisedTargets`` / ``TargetCache``); the only thing written here is the naive reference: PH-Reg's
structure - views one after another, fp32, no cache, out-of-frame pixels filled with 0 - feeding the
very same student step, so the two differ in how targets are made and nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn

from retrofit.features import grid_size, model_device, patch_features, patch_size
from retrofit.images import data_config
from retrofit.metrics import patch_cosine
from retrofit.module import RetrofitModule
from retrofit.synthetic import plant_artifacts, synthetic_images
from retrofit.targets import DenoisedTargets, Targets, Views, crop_center

# Without a Trainer, LightningModule.log warns on every step; the bench calls training_step bare.
warnings.filterwarnings("ignore", message=".*self.log\\(\\)")


def build_teacher(name: str, img_size: int, depth: int | None, artifacts: bool, device: str) -> nn.Module:
    """A random-init timm ViT with planted high-norm artifacts (``artifacts=False``: the same edit, switched off).

    Both come from :func:`retrofit.synthetic.plant_artifacts`, so the artifact-free row is the same network
    minus the artifact unit, not a different model.
    """
    kwargs: dict[str, Any] = {"img_size": img_size} | ({"depth": depth} if depth else {})
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, **kwargs).eval()
    # final_norm: outliers in the final features, where the view targets look for them (the figures time them)
    return plant_artifacts(base, final_norm=True, silent=not artifacts).to(device)


def view_margin(teacher: nn.Module, img_size: int) -> int:
    """Patches of real pixels around the student's window that the default target settings shift views into."""
    return DenoisedTargets(teacher).margin_patches(grid_size(teacher, img_size, img_size)[0])


def make_batch(teacher: nn.Module, n: int, img_size: int, margin: int, seed: int = 0, prefix: str = "img") -> dict:
    """A training batch per the batch contract: images with ``margin`` patches of real pixels, and keys."""
    p = patch_size(teacher)[0]
    device = model_device(teacher)
    cfg = data_config(teacher)  # normalised as the artifacts were calibrated
    images = synthetic_images(n, img_size + 2 * margin * p, seed=seed, mean=cfg["mean"], std=cfg["std"]).to(device)
    return {"image": images, "key": [f"{prefix}-{seed}-{i}" for i in range(n)]}


def _shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """``out[..., r, c] = t[..., r + dy, c + dx]``, 0 where that falls outside ``t`` (PH-Reg's fill)."""
    h, w = t.shape[-2:]
    out = torch.zeros_like(t)
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        t[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def naive_targets(teacher: nn.Module, images: Tensor, views: Views, layers: tuple[int, ...] = ()) -> Targets:
    """PH-Reg's test-time augmentation, view by view in fp32: shift with fill, flip, forward, undo, average.

    ``images`` is what the student sees; the views are the engine's own draw (same offsets and flips).
    The final features and each of ``layers`` (as the student's loss needs them) are averaged alike.
    """
    p = patch_size(teacher)[0]
    totals, count = None, None
    with torch.no_grad():
        for (dy, dx), flips in zip(views.offsets.tolist(), views.flips, strict=True):
            flip = flips.to(images.device)[:, None, None, None]
            view = _shift(images, dy * p, dx * p)
            view = torch.where(flip, view.flip(-1), view)
            grids = [patch_features(teacher, view)] + (patch_features(teacher, view, list(layers)) if layers else [])
            grids = [_shift(torch.where(flip, g.permute(0, 3, 1, 2).flip(-1), g.permute(0, 3, 1, 2)), -dy, -dx)
                     for g in grids]  # each (B, D, h, w), back on the original grid
            seen = _shift(torch.ones_like(grids[0][:, :1]), -dy, -dx)
            totals = grids if totals is None else [t + g for t, g in zip(totals, grids, strict=True)]
            count = seen if count is None else count + seen
    means = [(t / count.clamp(min=1)).permute(0, 2, 3, 1) for t in totals]
    coverage = count[:, 0].int()
    return Targets(features=means[0], layers=dict(zip(layers, means[1:], strict=True)), coverage=coverage,
                   outliers=torch.zeros_like(coverage, dtype=torch.bool))


class NaiveModule(RetrofitModule):
    """The engine's student step with targets from :func:`naive_targets` on the centre crop (no margin views)."""

    def batch_targets(self, images: Tensor, keys: Any) -> Targets:
        center = crop_center(images, self.margin * patch_size(self.teacher)[0])
        grid = grid_size(self.teacher, *center.shape[-2:])
        return naive_targets(self.teacher, center, self.targets.draw_views(len(images), grid), self.loss_layers)


@dataclass
class Trainee:
    """A module and its AdamW (the module's own parameter groups), stepped like Lightning would."""

    module: RetrofitModule
    optimizer: torch.optim.Optimizer
    autocast: bool = False
    step_count: int = 0

    @classmethod
    def build(cls, module_cls: type[RetrofitModule], teacher: nn.Module, batch: dict, margin: int,
              autocast: bool = False, **kwargs: Any) -> Trainee:
        """The module prepared on ``batch`` (where the artifacts build, register neurons) as a Trainer would, then
        its AdamW."""
        module = module_cls(teacher, **kwargs).to(model_device(teacher))
        module.margin = margin
        module.prepare(crop_center(batch["image"], margin * patch_size(teacher)[0]) if module.needs_images else None)
        optimizer = torch.optim.AdamW(module.param_groups(), lr=module.hparams.lr, betas=(0.9, 0.999))
        return cls(module.train(), optimizer, autocast)

    def step(self, batch: dict) -> float:
        """One full training step: targets, student forward/backward, optimizer; returns the loss."""
        device = batch["image"].device.type
        with torch.autocast(device, torch.bfloat16, enabled=self.autocast):
            loss = self.module.training_step(batch, self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return loss.item()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory of the block in MiB, into ``out["peak"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights, optimizer state and activations together).
    CPU: the rise of the process's resident-set high-water mark (VmHWM) over its RSS at entry; freed heap
    pages are returned (glibc ``malloc_trim``) and the mark is reset by writing 5 to /proc/self/clear_refs
    (Linux), so this is what the block adds on top of what was already resident (models, optimizer state).
    """
    out: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() / 2**20
        return
    with contextlib.suppress(OSError, AttributeError):  # return freed heap pages first (glibc), so RSS is live memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _rss_kib("VmRSS")
    yield out
    out["peak"] = (_rss_kib("VmHWM") - start) / 1024


@dataclass(frozen=True)
class Timing:
    seconds: float
    """Wall-clock seconds."""
    cpu: float
    """Process CPU seconds (all threads): steadier than wall time when other jobs share the cores."""
    peak: float
    """Peak MiB, see :func:`peak_memory`."""


def timed(fn: Callable[[], Any], device: str) -> Timing:
    """Wall time, CPU time and peak memory of one call."""
    with peak_memory(device) as mem:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Timing(seconds, cpu, mem["peak"])


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[Timing]]:
    """Each function ``repeats`` times, alternating (order reversed every round) so load drift hits all alike."""
    results: dict[str, list[Timing]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(timed(fns[name], device))
    return results


def spread(times: list[float]) -> str:
    """Median and range, for noisy shared machines."""
    return f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]"


def target_quality(targets: Targets, reference: Tensor, artifacts: Tensor) -> tuple[float, float]:
    """Patch cosine of the targets to the artifact-free model's features: all tokens, artifact positions."""
    cos = patch_cosine(targets.features, reference)
    return cos.mean().item(), (cos[artifacts].mean().item() if artifacts.any() else float("nan"))
