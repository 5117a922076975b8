"""The functions behind `retrofit diagnose`, `neurons`, `eval lost|probe`, `export` and `demo`.

Each takes what a command line gives (model specs, folders, numbers), calls the library, prints a
table or a line with rich and returns the result. jsonargparse builds each command's options from the
signature and the docstring (:mod:`retrofit.cli`), so both are the command's documentation. Each imports
the library when it runs, so that listing the commands (and exporting a model) loads only what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from .files import write_json

console = Console()


def _label(spec: str) -> str:
    return Path(spec).name or spec


def _with_registers(model: Any, ttr: str | None) -> AbstractContextManager[Any]:
    """``model`` (a timm ViT) with test-time registers from a ``retrofit neurons`` file, or as it is.

    Types here and in the command signatures name no torch class: jsonargparse resolves them to list the
    commands, and torch would make ``retrofit --help`` slow.
    """
    from .neurons import RegisterNeurons, test_time_registers

    return nullcontext(model) if ttr is None else test_time_registers(model, RegisterNeurons.load(ttr))


def diagnose_command(
    model: str,
    *,
    images: str,
    out: str = "diagnose_out",
    compare: str | None = None,
    checkpoint: str | None = None,
    compare_checkpoint: str | None = None,
    img_size: int | None = None,
    max_images: int = 8,
    k: float = 3.0,
    threshold: float | None = None,
    layers: list[int] | None = None,
    batch_size: int = 8,
    ttr: str | None = None,
    reference: str | None = None,
    reference_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Measure a model's artifacts: per-layer norm table, index.html, diagnose.json and one PNG of maps per image.

    Args:
        model: timm name, export directory, or timm name with --checkpoint (see retrofit.load_backbone).
        images: folder of images (searched recursively).
        out: folder for index.html (the report on one page), diagnose.json and the PNGs.
        compare: a second model shown beside the first (e.g. the original vs the retrofitted one).
        checkpoint: local weights file for a timm name in MODEL.
        compare_checkpoint: local weights file for a timm name in --compare.
        img_size: square input size (default: the model's own).
        max_images: use the first N readable images of the folder (unreadable ones are skipped and counted).
        k: outlier factor: norm above k x (or below 1/k x) the image median.
        threshold: absolute norm threshold for high-norm outliers instead of k (e.g. 150 as in Darcet et al.).
        layers: block indices to measure, e.g. --layers 11 or --layers 4 11 (-1: the last block; default: all).
        batch_size: images per forward.
        ttr: register-neuron file from `retrofit neurons`: MODEL runs with test-time registers (no training);
            without --compare, the plain MODEL is shown beside it.
        reference: an artifact-free model to score against (cosine at the artifacts, next to them, elsewhere).
        reference_checkpoint: local weights file for a timm name in --reference.
    """
    import copy

    from .backbones import load_backbone
    from .diagnose import diagnose, render_repair, render_residual, render_table
    from .features import square_size
    from .images import ImageLog, list_images, load_readable
    from .page import PAGE_NAME
    from .report import REPORT_NAME

    first = load_backbone(model, checkpoint)
    second = None if compare is None else load_backbone(compare, compare_checkpoint)
    truth = None if reference is None else load_backbone(reference, reference_checkpoint)
    unusable = ImageLog()
    batch, paths = load_readable(list_images(images), square_size(first, img_size), first, max_images,
                                 Path(images), unusable)
    labels = (_label(model), _label(compare or ""))
    labels = labels if compare is None or labels[0] != labels[1] else ("model", "compare")
    with_registers = first
    if ttr is not None and second is None:  # before / after test-time registers
        first, second = copy.deepcopy(first), first
        with_registers, labels = second, (labels[0], f"{labels[0]} + test-time registers")
    names = [p.relative_to(images).as_posix() for p in paths]
    with _with_registers(with_registers, ttr):
        report = diagnose(first, batch, out, second, k=k, layers=layers, names=names, labels=labels,
                          threshold=threshold, batch_size=batch_size, progress=True, reference=truth)
    console.print(render_table(report))
    console.print(render_residual(report))
    if (repair := render_repair(report)) is not None:
        console.print(repair)
    _print_unusable(unusable)
    console.print(f"wrote {Path(out) / PAGE_NAME} (the report on one page: open it in a browser), "
                  f"{REPORT_NAME} and {len(report['figures'])} figures", soft_wrap=True)
    return report


def neurons_command(
    model: str,
    *,
    images: str,
    out: str = "neurons.json",
    checkpoint: str | None = None,
    img_size: int | None = None,
    max_images: int = 100,
    min_lift: float = 2.0,
    min_alignment: float = 0.3,
    max_units: int = 64,
    k: float = 3.0,
    batch_size: int = 8,
) -> Any:
    """Find where a model's artifacts build and the MLP units that make them (register neurons), for training-free
    test-time registers and for `fit --model.register_neurons FILE`.

    Args:
        model: timm name, export directory, or timm name with --checkpoint (see retrofit.load_backbone).
        images: folder of images (searched recursively); 32 to 100 are enough.
        out: JSON file for the blocks and units (use it with `diagnose --ttr` and `eval ... --ttr`); written for
            a model without artifacts too, saying so.
        checkpoint: local weights file for a timm name in MODEL.
        img_size: square input size (default: the model's own); the units depend on it.
        max_images: use the first N readable images of the folder.
        min_lift: keep units at least this many times more active at the artifacts than elsewhere.
        min_alignment: keep units that write at least this share of their output along the artifacts.
        max_units: keep at most this many units per block (a guard, not a count to fill).
        k: outlier factor: norm above k x the image median.
        batch_size: images per forward.
    """
    from .backbones import load_backbone
    from .features import square_size
    from .images import ImageLog, list_images, load_readable
    from .neurons import find_register_neurons

    backbone = load_backbone(model, checkpoint)
    unusable = ImageLog()
    root = Path(images)
    batch, paths = load_readable(list_images(images), square_size(backbone, img_size), backbone, max_images, root,
                                 unusable)
    found = find_register_neurons(backbone, batch, k=k, min_lift=min_lift, min_alignment=min_alignment,
                                  max_units=max_units, batch_size=batch_size, progress=True,
                                  names=[p.relative_to(root).as_posix() for p in paths])
    peak = max(found.profile.outliers, default=0.0)
    console.print(f"{_label(model)}: {len(batch)} images, up to {100 * peak:.2f}% high-norm outliers in the residual "
                  f"stream; {found.describe()}")
    if found.count:
        table = Table(title="Register neurons", caption="share: what the unit writes along the artifacts, over their "
                      "norm above the median; lift: its activation there over elsewhere; aligned: how much of its "
                      "write lies along them; sparsity: tokens where it stays quiet",
                      caption_justify="left")
        for head in ("block", "unit", "share", "lift", "aligned", "sparsity"):
            table.add_column(head, justify="right")
        for block, unit, score, lift, alignment, sparsity in found.rows():
            table.add_row(str(block), str(unit), f"{score:.3g}", f"{lift:.3g}", f"{alignment:.2f}",
                          f"{100 * sparsity:.1f}%")
        console.print(table)
    elif found.blocks:
        console.print("the artifacts are not made by MLP units this search recognises: test-time registers "
                      "cannot move them; fit still trains where they build", soft_wrap=True)
    _print_unusable(unusable)
    console.print(f"wrote {found.save(out)}", soft_wrap=True)
    return found


def _print_unusable(log: Any) -> None:
    """The one-line account of skipped (and converted) images of an ``ImageLog``, as fit reports them."""
    if (line := log.summary()) is not None:
        console.print(line, highlight=False, soft_wrap=True)


def _report(title: str, result: dict[str, Any], out: str | None, shown: Sequence[str]) -> dict[str, Any]:
    table = Table("metric", "value", title=title)
    for name in shown:
        value = result[name]
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if out is not None:
        console.print(f"wrote {write_json(result, out)}", soft_wrap=True)
    return result


def eval_lost_command(
    model: str,
    *,
    dataset: str,
    checkpoint: str | None = None,
    boxes: str | None = None,
    box_format: Literal["xyxy", "xywh"] = "xyxy",
    split: str | None = None,
    img_size: int | None = None,
    k: int = 100,
    batch_size: int = 16,
    out: str | None = None,
    ttr: str | None = None,
) -> dict[str, Any]:
    """LOST object discovery: CorLoc of the box found from the last block's keys (Simeoni et al.).

    Args:
        model: timm name, export directory, or timm name with --checkpoint (see retrofit.load_backbone).
        dataset: image folder with boxes.json, or a Hugging Face dataset (saved folder or hub name).
        checkpoint: local weights file for a timm name in MODEL.
        boxes: JSON {"relative/path.jpg": [[x0, y0, x1, y1], ...]} for an image folder.
        box_format: xyxy (VOC corners) or xywh (COCO).
        split: dataset split for Hugging Face data.
        img_size: square evaluation size (default: the model's own).
        k: LOST's number of seed-expansion patches.
        batch_size: images per forward.
        out: write the full result (per-image boxes) to this JSON file.
        ttr: register-neuron file from `retrofit neurons`: evaluate MODEL with test-time registers.
    """
    from .backbones import load_backbone
    from .evaluate import box_dataset, evaluate_lost

    backbone = load_backbone(model, checkpoint)
    data = box_dataset(dataset, boxes, box_format, split)
    with _with_registers(backbone, ttr):
        result = evaluate_lost(backbone, data, img_size=img_size, k=k, batch_size=batch_size, progress=True)
    _print_unusable(data.log)
    return _report(f"LOST on {dataset}", result, out, ("corloc", "n", "skipped", "unreadable"))


def eval_probe_command(
    model: str,
    *,
    train: str,
    val: str,
    num_classes: int,
    checkpoint: str | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    img_size: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out: str | None = None,
    ttr: str | None = None,
) -> dict[str, Any]:
    """Linear-probe segmentation: a linear head on frozen patch features, mIoU on the validation set.

    Args:
        model: timm name, export directory, or timm name with --checkpoint (see retrofit.load_backbone).
        train: training masks: a folder with images/ and masks/, or a Hugging Face dataset.
        val: validation masks, same forms as train.
        num_classes: number of classes (mask value 255 is ignored).
        checkpoint: local weights file for a timm name in MODEL.
        epochs: passes of the linear head over the training features.
        lr: learning rate of the linear head.
        img_size: square evaluation size (default: the model's own).
        batch_size: images per forward.
        seed: seeds the head's init and order.
        out: write the full result (per-class IoU) to this JSON file.
        ttr: register-neuron file from `retrofit neurons`: evaluate MODEL with test-time registers.
    """
    from .backbones import load_backbone
    from .evaluate import evaluate_probe, mask_dataset

    backbone = load_backbone(model, checkpoint)
    train_set, val_set = mask_dataset(train), mask_dataset(val)
    with _with_registers(backbone, ttr):
        result = evaluate_probe(backbone, train_set, val_set, num_classes, epochs=epochs, lr=lr,
                                img_size=img_size, batch_size=batch_size, seed=seed, progress=True)
    for data in (train_set, val_set):
        _print_unusable(data.log)
    return _report(f"Linear probe on {val}", result, out,
                   ("miou", "accuracy", "train_loss", "n_train", "n_val", "unreadable"))


def export_command(
    checkpoint: str,
    *,
    out: str,
    backbone: str | None = None,
    overwrite: bool = False,
    diagnose: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Turn a training checkpoint (.ckpt from fit) into a timm-native model directory (LoRA merged).

    Args:
        checkpoint: Lightning .ckpt written by retrofit fit.
        out: directory to write (model.safetensors, config.json, README.md model card);
            timm.create_model('local-dir:OUT', pretrained=True) reads it.
        backbone: timm name of the original model, when the run started from a Python model object.
        overwrite: replace an existing non-empty OUT.
        diagnose: folder (or diagnose.json) of `retrofit diagnose MODEL --compare ORIGINAL`: its
            before/after numbers go into the model card.
        push_to_hub: also upload OUT to this Hugging Face Hub repo (USER/NAME) with timm's push_to_hf_hub;
            timm.create_model('hf-hub:USER/NAME', pretrained=True) then loads it. Needs `hf auth login`.
        private: create the Hub repo as private.
    """
    from . import hub
    from ._export import check_free
    from .callbacks import RegisterExport
    from .module import RetrofitModule
    from .surgery import count_registers

    if push_to_hub is not None:
        hub.check_repo(push_to_hub)
    check_free(out, overwrite)  # before the checkpoint and its backbone are loaded
    module, record = RetrofitModule.from_checkpoint(checkpoint, backbone)
    step = int(record.get("global_step", 0))
    path = module.export(out, overwrite=overwrite, diagnose_report=diagnose, repo_id=push_to_hub,
                         **{**RegisterExport.saved_facts(record), "step": step})
    registers = count_registers(module.student_vit)
    console.print(f"exported {path} ({registers} registers in total, step {step})", soft_wrap=True)
    if push_to_hub is not None:
        with console.status(f"pushing {path} to the Hugging Face Hub as {push_to_hub}"):
            url = hub.push_to_hub(path, push_to_hub, private=private)
        console.print(f"pushed: {url}\nload it with timm.create_model(\"hf-hub:{push_to_hub}\", pretrained=True)",
                      soft_wrap=True)
    return path


def demo_command(out: str = "demo_out", steps: int = 100, num_images: int = 48, overwrite: bool = True) -> dict:
    """Offline demo: retrofit a small ViT with planted (synthetic) artifacts; before/after maps and numbers.

    Args:
        out: folder for maps/ (before/after PNGs), metrics.json and model/ (the timm-native export).
        steps: training steps (fewer: faster, less clean).
        num_images: synthetic training images to make.
        overwrite: replace the results of an earlier demo in OUT.
    """
    from .demo import run_demo

    return run_demo(out, steps=steps, num_images=num_images, overwrite=overwrite, console=console)
