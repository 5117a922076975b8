"""`retrofit demo`: the whole pipeline offline, in minutes on a laptop CPU, with before/after pictures.

No pretrained weights can be assumed, so the demo makes its own artifact model: a small random timm ViT
whose weights are edited (:func:`retrofit.synthetic.plant_artifacts`) so that flat background patches on
a few grid positions carry high-norm tokens - SYNTHETIC artifacts, a stand-in for the ones large
pretrained ViTs learn. The edited model with its artifact unit switched off is the artifact-free truth
the result is scored against. Training goes through :func:`retrofit.api.retrofit`, the same path as
``retrofit fit`` and the Python API; pictures and numbers come from :func:`retrofit.diagnose.diagnose`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .api import retrofit
from .callbacks import StepProgressBar
from .diagnose import diagnose
from .errors import RetrofitError
from .features import inference, patch_features
from .files import write_json
from .images import data_config
from .metrics import outlier_mask, patch_cosine
from .synthetic import plant_artifacts, synthetic_images

SIZE, PATCH = 96, 8  # a 12 x 12 patch grid: room for a few artifact sites, fast on a CPU
LABELS = ("original (synthetic artifacts)", "retrofitted (4 registers)")
# Settings that converge in ~100 steps on this small model; the recipes hold the real-model ones.
TRAINING = dict(num_registers=4, batch_size=8, lr=1e-2, min_lr=5e-4, register_init="timm", random_crop=False)


def demo_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The artifact model and its artifact-free twin (same weights, artifact unit off)."""
    torch.manual_seed(seed)
    base = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH).eval()
    return plant_artifacts(base, seed=seed), plant_artifacts(base, seed=seed, silent=True)


def _images(n: int, size: int, seed: int, model: nn.Module) -> torch.Tensor:
    cfg = data_config(model)
    return synthetic_images(n, size, seed=seed, mean=cfg["mean"], std=cfg["std"])


def score(features: torch.Tensor, reference: torch.Tensor, artifacts: torch.Tensor) -> dict[str, float]:
    """High-norm outlier fraction and patch cosine to the artifact-free truth (all / artifact positions)."""
    cosine = patch_cosine(features, reference)
    return {
        "outlier_fraction": outlier_mask(features).float().mean().item(),
        "cosine_to_truth": cosine.mean().item(),
        "cosine_to_truth_at_artifacts": cosine[artifacts].mean().item(),
    }


def summary_table(metrics: dict[str, Any]) -> Table:
    before, after = metrics["before"], metrics["after"]
    table = Table(title=f"retrofit demo: {metrics['held_out_images']} held-out synthetic images, "
                        f"{metrics['steps']} steps")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("retrofitted", justify="right")
    table.add_row("high-norm outliers (> 3x median norm)",
                  f"{100 * before['outlier_fraction']:.2f}%", f"{100 * after['outlier_fraction']:.2f}%")
    table.add_row("cosine to artifact-free truth, all patches",
                  f"{before['cosine_to_truth']:.3f}", f"{after['cosine_to_truth']:.3f}")
    table.add_row("cosine to truth at artifact patches",
                  f"{before['cosine_to_truth_at_artifacts']:.3f}", f"{after['cosine_to_truth_at_artifacts']:.3f}")
    table.caption = f"wall time {metrics['wall_time_s']:.0f} s; outputs in {metrics['out_dir']}"
    return table


def _fresh(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RetrofitError(f"{out} already holds demo results: pass --overwrite true or another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(
    out_dir: str | Path = "demo_out", steps: int = 100, num_images: int = 48, held_out: int = 8,
    overwrite: bool = True, seed: int = 0, console: Console | None = None,
) -> dict[str, Any]:
    """Plant, retrofit, export and measure; writes ``maps/`` (before/after PNGs + diagnose.json),
    ``metrics.json`` and ``model/`` (timm-native) under ``out_dir`` and returns the metrics."""
    if steps < 1 or num_images < 1 or held_out < 1:
        raise RetrofitError(f"steps, num_images and held_out must be >= 1, got {steps}, {num_images}, {held_out}.")
    start, out, console = time.perf_counter(), Path(out_dir), console or Console()
    _fresh(out, overwrite)
    planted, truth = demo_models(seed)
    train = _images(num_images, SIZE + 2 * PATCH, seed + 1, planted)  # a 1-patch margin for shifted views
    held = _images(held_out, SIZE, seed + 2, planted)
    model = retrofit(
        planted, train, out_dir=out / "model", max_steps=steps, accelerator="cpu", precision="32-true",
        cache_dir=str(out / "target_cache"), callbacks=[StepProgressBar()], enable_model_summary=False,
        **TRAINING,
    )
    shutil.rmtree(out / "target_cache", ignore_errors=True)
    with inference(planted), inference(truth), inference(model):
        before, after, reference = (patch_features(m, held) for m in (planted, model, truth))
    artifacts = outlier_mask(before)
    diagnose(planted, held, out / "maps", compare=model, labels=LABELS)
    metrics = {
        "note": "synthetic artifacts planted into a random test_vit (retrofit.synthetic); not a pretrained model",
        "steps": steps,
        "training_images": num_images,
        "held_out_images": held_out,
        "before": score(before, reference, artifacts),
        "after": score(after, reference, artifacts),
        "out_dir": str(out),
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(metrics, out / "metrics.json")
    console.print(summary_table(metrics))
    return metrics
