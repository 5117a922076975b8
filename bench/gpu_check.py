"""One-shot GPU check: speed, memory, precision and a cost projection, on random-init models with planted artifacts.

    bash bench/gpu_check.sh --peak-tflops 989.4      # H100 SXM / H200 dense bf16; under 8 minutes, no downloads
    bash bench/gpu_check.sh --smoke                  # tiny CPU run of the same code (tests run this)

Prints one Markdown table: s/step, images/s, TFLOP/step, MFU and peak memory of a default-preset training
step (ViT-B/14 and ViT-L/14 at 518 px, batch 16; ViT-L also with gradient checkpointing), target quality
with the teacher in bf16 against float32, whether ``16-mixed`` runs without overflow, and the projected
GPU-hours of the ``dinov2_vitb14_reg4`` recipe (1000 steps of 16 images). Steps go through the engine itself
(``RetrofitModule.training_step``, its targets and AdamW groups), as in ``bench/train_step.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import timm
import torch
from common import Trainee, make_batch, target_quality, timed, view_margin
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from retrofit.features import patch_features, patch_size
from retrofit.metrics import outlier_mask
from retrofit.module import RetrofitModule
from retrofit.synthetic import plant_artifacts
from retrofit.targets import DenoisedTargets, TargetSettings, crop_center

RECIPE_STEPS, RECIPE_BATCH = 1000, 16  # recipes/dinov2_vitb14_reg4.yaml


@dataclass(frozen=True)
class Case:
    arch: str
    img_size: int
    batch: int
    depth: int | None = None  # fewer blocks (smoke)
    kwargs: tuple[tuple[str, Any], ...] = ()


FULL = {"vit_b": Case("vit_base_patch14_dinov2", 518, 16), "vit_l": Case("vit_large_patch14_dinov2", 518, 16)}
SMOKE = {"vit_b": Case("test_vit", 64, 4, kwargs=(("patch_size", 8),)),
         "vit_l": Case("test_vit", 64, 4, depth=3, kwargs=(("patch_size", 8),))}


def teachers(case: Case, device: str) -> tuple[nn.Module, nn.Module]:
    """The planted model and its artifact-free twin (random init, no download), on ``device``."""
    kwargs = {"img_size": case.img_size, **dict(case.kwargs)} | ({"depth": case.depth} if case.depth else {})
    torch.manual_seed(0)
    base = timm.create_model(case.arch, pretrained=False, num_classes=0, **kwargs).eval().to(device)
    shown = dict(final_norm=True)  # outliers in the final features, where the view targets look for them
    return plant_artifacts(base, **shown), plant_artifacts(base, **shown, silent=True)


def step_row(name: str, case: Case, teacher: nn.Module, args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """Timing, FLOPs and peak memory of default-preset steps (bf16 autocast on CUDA, like ``bf16-mixed``)."""
    margin = view_margin(teacher, case.img_size)
    batch = make_batch(teacher, case.batch, case.img_size, margin)
    try:
        t = Trainee.build(RetrofitModule, teacher, batch, margin, args.device == "cuda", **kwargs)
        t.step(batch)  # warm-up: kernels, allocator
        runs = [timed(lambda: t.step(batch), args.device) for _ in range(args.steps)]
        with FlopCounterMode(display=False) as counter:
            t.step(batch)
    except torch.OutOfMemoryError:
        return {"run": name, "note": "out of memory"}
    seconds, peak = statistics.median(r.seconds for r in runs), max(r.peak for r in runs)
    tflop = counter.get_total_flops() / 1e12
    mfu = f"{100 * tflop / seconds / args.peak_tflops:.1f}%" if args.device == "cuda" else "n/a (CPU)"
    return {"run": name, "s/step": f"{seconds:.3f}", "images/s": f"{case.batch / seconds:.1f}",
            "TFLOP/step": f"{tflop:.2f}", "MFU": mfu, "peak MiB": f"{peak:.0f}", "seconds": seconds}


def quality_row(case: Case, teacher: nn.Module, twin: nn.Module, device: str) -> dict[str, Any]:
    """Target cosine to the twin's features (all / artifact positions), teacher in bf16 vs float32."""
    margin = view_margin(teacher, case.img_size)
    batch = make_batch(teacher, case.batch, case.img_size, margin, seed=3)
    center = crop_center(batch["image"], margin * patch_size(teacher)[0])
    with torch.no_grad():
        reference, artifacts = patch_features(twin, center), outlier_mask(patch_features(teacher, center))
    cells = []
    for bf16 in (True, False):
        targets = DenoisedTargets(teacher, replace(TargetSettings(), bf16=bf16))(batch["image"], margin)
        cells.append("{:.4f} / {:.4f}".format(*target_quality(targets, reference, artifacts)))
    return {"run": "targets: cos to the twin, all / artifacts", "s/step": f"bf16 {cells[0]}",
            "images/s": f"fp32 {cells[1]}"}


def fp16_row(case: Case, teacher: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """A few ``16-mixed`` steps (fp16 autocast + GradScaler): finite, or the overflow named with its fix."""
    if args.device != "cuda":
        return {"run": "16-mixed", "note": "CUDA only"}
    margin = view_margin(teacher, case.img_size)
    batch = make_batch(teacher, case.batch, case.img_size, margin)
    t = Trainee.build(RetrofitModule, teacher, batch, margin)
    scaler = torch.amp.GradScaler("cuda")
    for step in range(3):
        with torch.autocast("cuda", torch.float16):
            loss = t.module.training_step(batch, step)
        if not torch.isfinite(loss):
            return {"run": "16-mixed", "note": f"non-finite loss at step {step}: float16 overflow, use bf16-mixed"}
        t.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(t.optimizer)
        scaler.update()
    return {"run": "16-mixed", "note": f"3 steps finite (loss {loss.item():.4f}, grad scale {scaler.get_scale():g})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak of the GPU (H100 SXM/H200)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, no figures")
    args = parser.parse_args()
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.smoke:
        args.steps = 1
    cases = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    rows: list[dict[str, Any]] = []

    vit_b, twin_b = teachers(cases["vit_b"], args.device)
    b = step_row(f"{cases['vit_b'].arch} {cases['vit_b'].img_size}px b{cases['vit_b'].batch}, default preset",
                 cases["vit_b"], vit_b, args)
    rows += [b, quality_row(cases["vit_b"], vit_b, twin_b, args.device), fp16_row(cases["vit_b"], vit_b, args)]
    del twin_b
    vit_l, _ = teachers(cases["vit_l"], args.device)
    for checkpointing in (False, True):
        name = f"{cases['vit_l'].arch} {cases['vit_l'].img_size}px b{cases['vit_l'].batch}, grad ckpt {checkpointing}"
        rows.append(step_row(name, cases["vit_l"], vit_l, args, grad_checkpointing=checkpointing))
    if "seconds" in b:
        hours = RECIPE_STEPS * b["seconds"] / 3600
        rows.append({"run": f"projection: dinov2_vitb14_reg4 recipe ({RECIPE_STEPS} steps x {RECIPE_BATCH}; 10k "
                            f"images = {RECIPE_STEPS * RECIPE_BATCH / 10_000:.1f} epochs)",
                     "s/step": f"{hours:.2f} GPU-hours on this device"})

    columns = ["run", "s/step", "images/s", "TFLOP/step", "MFU", "peak MiB", "note"]
    print(f"gpu_check on {machine}, torch {torch.__version__}, timm {timm.__version__}, "
          f"{time.perf_counter() - start:.0f} s")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    main()
