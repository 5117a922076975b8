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
from .diagnose import diagnose
from .errors import RetrofitError
from .features import inference, patch_features
from .files import write_json
from .images import data_config
from .metrics import outlier_mask, repair_scores
from .synthetic import plant_artifacts, synthetic_images

SIZE, PATCH = 96, 8  # a 12 x 12 patch grid: room for a few artifact sites, fast on a CPU
LABELS = ("original (synthetic artifacts)", "retrofitted (4 registers)")
# Settings that converge in ~100 steps on this small model; the recipes hold the real-model ones.
# A random-init toy learns faster than a pretrained ViT: a higher lr than the default, otherwise the defaults.
TRAINING = dict(num_registers=4, batch_size=8, lr=3e-3, min_lr=1.5e-4, random_crop=False)


def demo_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The artifact model and its artifact-free twin (same weights, artifact unit off)."""
    torch.manual_seed(seed)
    base = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH).eval()
    shown = dict(seed=seed, final_norm=True)  # the final norm shows them, so the maps do
    return plant_artifacts(base, **shown), plant_artifacts(base, **shown, silent=True)


def _images(n: int, size: int, seed: int, model: nn.Module) -> torch.Tensor:
    cfg = data_config(model)
    return synthetic_images(n, size, seed=seed, mean=cfg["mean"], std=cfg["std"])


def score(features: torch.Tensor, reference: torch.Tensor, artifacts: torch.Tensor) -> dict[str, float]:
    """High-norm outlier fraction and patch cosine to the artifact-free truth (:func:`repair_scores`)."""
    return {"outlier_fraction": outlier_mask(features).float().mean().item(),
            **{f"cosine_{k}": v for k, v in repair_scores(features, reference, artifacts).items()}}


ROWS = (("outliers (> 3x median norm)", "outlier_fraction"), ("cosine to truth, all patches", "cosine_all"),
        ("  at the artifacts", "cosine_artifacts"), ("  next to them", "cosine_neighbours"),
        ("  elsewhere", "cosine_elsewhere"))


def summary_table(metrics: dict[str, Any]) -> Table:
    """Before and after at the training size and at 1.5x it (held-out images), one column pair each."""
    table = Table(title=f"retrofit demo: {metrics['held_out_images']} held-out synthetic images, "
                        f"{metrics['steps']} steps")
    table.add_column("")
    sizes = list(metrics["held_out"])
    for size in sizes:
        table.add_column(f"{size} px\nbefore", justify="right")
        table.add_column(f"{size} px\nafter", justify="right")
    for label, key in ROWS:
        cells = [metrics["held_out"][size][when][key] for size in sizes for when in ("before", "after")]
        table.add_row(label, *(f"{100 * v:.2f}%" if key == "outlier_fraction" else f"{v:.3f}" for v in cells))
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
    held = {size: _images(held_out, size, seed + 2, planted) for size in (SIZE, SIZE * 3 // 2)}  # trained, untrained
    model = retrofit(
        planted, train, out_dir=out / "model", max_steps=steps, accelerator="cpu",
        cache_dir=str(out / "target_cache"), enable_model_summary=False, **TRAINING,
    )
    shutil.rmtree(out / "target_cache", ignore_errors=True)
    scores = {}
    with inference(planted), inference(truth), inference(model):
        for size, images in held.items():
            before, after, reference = (patch_features(m, images) for m in (planted, model, truth))
            artifacts = outlier_mask(before)
            scores[size] = {"before": score(before, reference, artifacts), "after": score(after, reference, artifacts)}
    diagnose(planted, held[SIZE], out / "maps", compare=model, labels=LABELS, reference=truth)
    metrics = {
        "note": "synthetic artifacts planted into a random test_vit (retrofit.synthetic); not a pretrained model",
        "steps": steps,
        "training_images": num_images,
        "held_out_images": held_out,
        "held_out": scores,
        "out_dir": str(out),
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(metrics, out / "metrics.json")
    console.print(summary_table(metrics))
    return metrics
