"""diagnose: how many artifacts a model has, per layer, with figures a user can look at (before/after).

The function takes loaded models and an image tensor and returns plain data (what the CLI prints and
writes), so the CLI, notebooks and benchmarks all read the same numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.table import Table
from torch import Tensor, nn

from .attention import NO_CLS_NOTE
from .errors import RetrofitError
from .features import block_indices, inference, model_device, patch_features
from .files import write_json
from .maps import ImageMaps, compute_maps, display_rgb
from .metrics import (
    REPAIR_KEYS,
    FeatureFidelity,
    OutlierFraction,
    PatchNormStats,
    PositionLeakage,
    outlier_mask,
    outlier_masks,
    repair_scores,
    token_norms,
)
from .page import write_page
from .plots import plot_heads, plot_maps, save_figure
from .progress import track
from .report import REPORT_NAME, percent
from .surgery import count_registers, has_class_token


def _check_inputs(images: Tensor, names: Sequence[str] | None, labels: Sequence[str], compare: nn.Module | None):
    if not isinstance(images, Tensor) or images.ndim != 4 or not len(images):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RetrofitError(
            f"images must be a non-empty (N, 3, H, W) tensor (see retrofit.images.load_images), got {shape}."
        )
    if names is not None and len(names) != len(images):
        raise RetrofitError(f"got {len(names)} names for {len(images)} images: pass one name per image.")
    if compare is not None and (len(labels) != 2 or labels[0] == labels[1]):
        raise RetrofitError(f"labels must be two different names for model and compare, got {list(labels)}.")


def _layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Every block by default; else the requested ones, checked and in model order."""
    return list(range(len(model.blocks))) if layers is None else list(block_indices(model, layers))


def _batch_starts(n: int, batch_size: int, description: str, progress: bool) -> Iterable[int]:
    """Batch offsets, shown as a rich progress bar when ``progress``."""
    return track(range(0, n, batch_size), description, enabled=progress)


def _image_stats(names: Sequence[str], grid: Tensor, k: float, threshold: float | None) -> list[dict[str, Any]]:
    """Last-layer numbers of each image in a batch grid (B, H, W, D)."""
    norms = token_norms(grid).flatten(1)
    high, low = outlier_masks(norms, k, threshold)
    return [
        {"image": name, "median_norm": n.median().item(), "max_norm": n.max().item(),
         "high": h.float().mean().item(), "low": lo.float().mean().item()}
        for name, n, h, lo in zip(names, norms, high, low, strict=True)
    ]


def _model_summary(
    model: nn.Module, label: str, images: Tensor, names: Sequence[str], layers: list[int],
    k: float, threshold: float | None, norm: bool, batch_size: int, progress: bool = False,
) -> dict[str, Any]:
    """Per-layer norm statistics and outlier fractions over all images, plus per-image numbers."""
    device = model_device(model)
    stats = PatchNormStats(layers=layers).to(device)
    outliers = OutlierFraction(k, threshold, layers=layers).to(device)
    leakage = PositionLeakage().to(device)
    per_image = []
    for start in _batch_starts(len(images), batch_size, f"measuring {label}", progress):
        batch = images[start:start + batch_size].to(device)
        with inference(model):
            grids = patch_features(model, batch, layers=layers, norm=norm)
        stats.update(grids)
        outliers.update(grids)
        leakage.update(grids[-1])
        batch_names = names[start:start + len(batch)]
        per_image += _image_stats(batch_names, grids[-1], k, threshold)
    values = {**stats.compute(), **outliers.compute()}
    return {
        "label": label,
        "architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
        "num_registers": count_registers(model),
        "class_token": has_class_token(model),
        "cls_attention": f"last block, {model.blocks[-1].attn.num_heads} heads" if has_class_token(model)
        else NO_CLS_NOTE,
        "layers": [
            {"layer": i, **{s: values[f"layer{i}/{s}"].item() for s in ("median", "p99", "max", "high", "low")}}
            for i in layers
        ],
        "position_leakage": leakage.compute().item() if len(images) > 1 else None,
        "images": per_image,
    }


def _cosine(
    models: Sequence[tuple[str, nn.Module]], images: Tensor, norm: bool, batch_size: int, progress: bool = False
) -> dict[str, float] | None:
    """Patch cosine of the second model's final features to the first's (None where the grids differ)."""
    (_, first), (_, second) = models
    fidelity = FeatureFidelity().to(model_device(first))
    for start in _batch_starts(len(images), batch_size, "comparing features", progress):
        grids = []
        for model in (first, second):
            with inference(model):
                grids.append(patch_features(model, images[start:start + batch_size].to(model_device(model)),
                                            norm=norm).to(model_device(first)))
        if grids[0].shape != grids[1].shape:
            return None
        fidelity.update(grids[1], grids[0])
    return {k: v.item() for k, v in fidelity.compute().items()}


def _repair(models: Sequence[tuple[str, nn.Module]], reference: nn.Module, images: Tensor, k: float,
            threshold: float | None, batch_size: int) -> dict[str, dict[str, float]]:
    """Each model's patch cosine to the reference, at the first model's artifacts, next to them and elsewhere."""
    grids = {}
    for label, model in [*models, ("reference", reference)]:
        with inference(model):
            grids[label] = torch.cat([patch_features(model, images[i:i + batch_size].to(model_device(model))).cpu()
                                      for i in range(0, len(images), batch_size)])
    artifacts = outlier_mask(grids[models[0][0]], k, threshold)
    return {label: repair_scores(grids[label], grids["reference"], artifacts) for label, _ in models}


def _file_stems(names: Sequence[str]) -> list[str]:
    """Safe, unique, ordered file names: ``003_sub_dir_cat`` for image 3 named ``sub/dir/cat.jpg``."""
    return [f"{i:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', str(Path(n).with_suffix('')))}" for i, n in enumerate(names)]


def _as_list(t: Tensor | None) -> Any:
    return None if t is None else t.float().round(decimals=4).tolist()


def _figure_data(maps: ImageMaps) -> dict[str, Any]:
    """What one figure row shows, as JSON lists (4 decimals)."""
    return {
        "norm": _as_list(maps.norms),
        "high_norm_outlier": maps.outliers.tolist(),
        "cls_attention": _as_list(None if maps.attention is None else maps.attention.mean(dim=0)),
        "cls_attention_heads": _as_list(maps.attention),
        "pca_rgb": _as_list(maps.pca),
    }


def _write_figures(
    models: Sequence[tuple[str, nn.Module]], images: Tensor, names: Sequence[str], out_dir: Path,
    k: float, threshold: float | None, batch_size: int, progress: bool = False,
) -> list[dict[str, Any]]:
    """One PNG per image (models side by side in rows) plus one of every head; returns the figures' data."""
    entries = []
    stems = _file_stems(names)
    for start in _batch_starts(len(images), batch_size, "drawing maps", progress):
        batch = images[start:start + batch_size]
        rgb = display_rgb(batch, models[0][1])
        maps = {label: compute_maps(model, batch, k, threshold) for label, model in models}
        batch_names, batch_stems = names[start:start + len(batch)], stems[start:start + len(batch)]
        for i, (name, stem) in enumerate(zip(batch_names, batch_stems, strict=True)):
            rows = [(label, rgb[i], maps[label][i]) for label, _ in models]
            save_figure(plot_maps(rows), out_dir / f"{stem}.png")
            heads = plot_heads(rows)
            if heads is not None:
                save_figure(heads, out_dir / f"{stem}_heads.png")
            entries.append({
                "image": name,
                "png": f"{stem}.png",
                "heads_png": None if heads is None else f"{stem}_heads.png",
                "maps": {label: _figure_data(maps[label][i]) for label, _ in models},
            })
    return entries


def diagnose(
    model: nn.Module,
    images: Tensor,
    out_dir: str | Path | None = None,
    compare: nn.Module | None = None,
    k: float = 3.0,
    layers: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    labels: Sequence[str] = ("model", "compare"),
    threshold: float | None = None,
    norm: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Artifact report of ``model`` (and ``compare``, e.g. before/after) on normalised ``images`` (N, 3, H, W).

    Per model and layer (all blocks by default; features after the final norm unless ``norm=False``):
    median / p99 / max patch-token norm and the high- and low-norm outlier fractions (``k`` x the
    image median, or above ``threshold``); per image the last layer's numbers; the position-leakage
    R^2 of the last layer (None for a single image). With ``out_dir``: ``NNN_<name>.png`` per image
    (input, norm map, CLS attention, PCA; one row per model), ``NNN_<name>_heads.png`` (CLS attention
    per head, for models with a class token) and ``diagnose.json`` holding the report and every
    figure's data under ``"figures"``, and ``index.html``: the whole report on one self-contained page.
    With ``compare``, ``"cosine"`` is the patch cosine (mean, 5th percentile) of ``compare``'s final
    features to ``model``'s. With ``reference`` (an artifact-free model, e.g. a synthetic model's twin),
    ``"repair"`` holds each model's :func:`retrofit.metrics.repair_scores` against it, at the positions that
    are artifacts in ``model``. ``progress`` shows rich progress bars. Returns the report.
    """
    _check_inputs(images, names, labels, compare)
    names = [f"image{i}" for i in range(len(images))] if names is None else [str(n) for n in names]
    models = [(labels[0], model)] + ([] if compare is None else [(labels[1], compare)])
    report: dict[str, Any] = {
        "settings": {"k": k, "threshold": threshold, "norm": norm, "input_size": list(images.shape[-2:])},
        "images": names,
        "models": [
            _model_summary(m, label, images, names, _layers(m, layers), k, threshold, norm, batch_size,
                           progress)
            for label, m in models
        ],
    }
    if compare is not None:
        report["cosine"] = _cosine(models, images, norm, batch_size, progress)
    if reference is not None:
        report["repair"] = _repair(models, reference, images, k, threshold, batch_size)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["figures"] = _write_figures(models, images, names, out, k, threshold, batch_size, progress)
        write_json(report, out / REPORT_NAME)
        write_page(report, out)
    return report


def render_table(report: dict[str, Any]) -> Table:
    """The per-layer numbers of a :func:`diagnose` report as a rich table.

    Models are compared row by row (one row per layer and model), so the table stays readable in an
    80-column terminal: numbers never wrap, only a long model label may.
    """
    k = report["settings"]["k"]
    models = report["models"]
    table = Table(box=box.SIMPLE_HEAD, title=f"Patch-token norms per layer ({len(report['images'])} images; "
                  f"outliers: > {k:g}x or < 1/{k:g}x the image median)")
    table.add_column("layer", justify="right", no_wrap=True)
    if len(models) > 1:
        table.add_column("model", overflow="fold")
    for head in ("median", "p99", "max", "high-norm", "low-norm"):
        table.add_column(head, justify="right", no_wrap=True)
    by_layer = [{e["layer"]: e for e in m["layers"]} for m in models]
    for layer in sorted(set().union(*by_layer)):
        for summary, entries in zip(models, by_layer, strict=True):
            if layer in entries:
                e = entries[layer]
                label = [summary["label"]] if len(models) > 1 else []
                table.add_row(str(layer), *label, f"{e['median']:.3g}", f"{e['p99']:.3g}", f"{e['max']:.3g}",
                              percent(e["high"]), percent(e["low"]))
        table.add_section()
    table.caption = "; ".join(
        f"{s['label']}: {s['num_registers']} registers, position leakage R^2 "
        + ("n/a (1 image)" if s["position_leakage"] is None else f"{s['position_leakage']:.3f}")
        + ("" if s["class_token"] else f", {NO_CLS_NOTE}")
        for s in models
    )
    return table


def render_repair(report: dict[str, Any]) -> Table | None:
    """Each model's patch cosine to the artifact-free reference, where the artifacts were and around them."""
    if not report.get("repair"):
        return None
    table = Table(box=box.SIMPLE_HEAD, title="Patch cosine to the reference (artifact-free) model")
    table.add_column("model", overflow="fold")
    for head in REPAIR_KEYS:
        table.add_column(head, justify="right", no_wrap=True)
    for label, scores in report["repair"].items():
        table.add_row(label, *(f"{scores[key]:.3f}" for key in REPAIR_KEYS))
    return table
