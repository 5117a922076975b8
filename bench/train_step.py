"""Training-step throughput and peak memory: our engine against a naive PH-Reg loop, same model, batch and run.

    python bench/train_step.py --model vit_small_patch14_dinov2 --depth 6 --img-size 112
    python bench/train_step.py --model vit_base_patch14_dinov2 --img-size 518 --device cuda --batch 16

Prints one row per configuration (``default``: RetrofitModule with no settings at all; then each target lever)
next to the naive loop,
with images/s, the time ratio ours / naive, peak memory and the targets' cosine to the artifact-free
model; then first vs later epoch with the target cache, and the projected wall time of a full run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

import torch
from common import (
    NaiveModule,
    Timing,
    Trainee,
    build_teacher,
    interleaved,
    make_batch,
    spread,
    target_quality,
    timed,
    view_margin,
)
from torch.utils.flop_counter import FlopCounterMode

from retrofit.features import grid_size, patch_features, patch_size
from retrofit.metrics import outlier_mask
from retrofit.module import RetrofitModule
from retrofit.targets import Targets, crop_center

# Dense bf16 peak of the GPUs the goal is stated for (NVIDIA datasheets, no sparsity).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
PREVIOUS = "previous default (views, float32, all 10, not masked)"  # the engine's defaults before the repair work


def configs() -> dict[str, dict[str, Any]]:
    """RetrofitModule settings per row: the defaults with no flags first, the target levers one by one, then the
    other freeze presets (``default`` is ``auto``: registers and the blocks where the artifacts build)."""
    views = {"register_neurons": None}  # targets from shifted views only
    return {
        "default": {},
        "default, float32 teacher (a CPU without native bf16)": {"targets": {"bf16": False}},
        "views (no register neurons)": views,
        "views, float32 teacher": views | {"targets": {"bf16": False}},
        "views, all 10 (no adaptive count)": views | {"targets": {"min_clean_views": 0}},
        "views, outliers not masked": views | {"targets": {"mask_outliers": False}},
        PREVIOUS: views | {
            "targets": {"bf16": False, "min_clean_views": 0, "mask_outliers": False}},
        # what trains: the student's backward reaches down to the lowest trained block (or the embeddings)
        "freeze phreg (embeddings + last block)": {"freeze": "phreg"},
        "freeze last-k 1": {"freeze": "last-k"},
        "freeze lora": {"freeze": "lora"},
        "freeze full": {"freeze": "full"},
    }


def peak_tflops(device: str, override: float | None) -> float | None:
    if override or device != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(trainee: Trainee, batch: dict) -> int:
    """FLOPs of one training step as executed (teacher views, student forward and backward), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        trainee.step(batch)
    return counter.get_total_flops()


def quality_row(trainee: Trainee, reference: torch.Tensor, mask: torch.Tensor, batch: dict, repeats: int,
                device: str) -> str:
    """The teacher's seconds per image for the targets (the naive loop's, or the engine's), their cosine to the
    artifact-free features (all / artifact positions) and their outlier share."""
    def make() -> Targets:
        return trainee.module.batch_targets(batch["image"], batch["key"])

    seconds = statistics.median(timed(make, device).seconds for _ in range(repeats)) / len(batch["image"])
    targets = make()
    cos_all, cos_art = target_quality(targets, reference, mask)
    left = outlier_mask(targets.features).float().mean().item()
    return f"{seconds:.4f} | {cos_all:.4f} / {cos_art:.4f} / {100 * left:.2f}%"


def cache_epochs(teacher: torch.nn.Module, settings: dict[str, Any], args: argparse.Namespace, margin: int,
                 student_bf16: bool) -> tuple[list[float], list[float]]:
    """Seconds per image of a first epoch (compute and store targets) and a second one (read them)."""
    with tempfile.TemporaryDirectory() as root:
        warmup = make_batch(teacher, args.batch, args.img_size, margin, prefix="warmup")
        trainee = Trainee.build(RetrofitModule, teacher, warmup, margin, student_bf16, cache_dir=root, **settings)
        trainee.step(warmup)  # fingerprint, lazy init
        first, later = [], []
        for r in range(args.repeats):
            batches = [make_batch(teacher, args.batch, args.img_size, margin, seed=i, prefix=f"r{r}")
                       for i in range(args.epoch_batches)]
            for times in (first, later):
                seconds = sum(timed(lambda b=batch: trainee.step(b), args.device).seconds for batch in batches)
                times.append(seconds / (len(batches) * args.batch))
    return first, later


def phases(trainee: Trainee, batch: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of a step's parts: the teacher's targets, the student's forward with the loss, and its
    backward with the optimizer step (a step with the targets made in advance, minus its forward)."""
    module = trainee.module

    def median(fn: Any) -> float:
        return statistics.median(timed(fn, device).seconds for _ in range(repeats))

    teacher = median(lambda: module.batch_targets(batch["image"], batch["key"]))
    ready = module.batch_targets(batch["image"], batch["key"])
    module.batch_targets = lambda images, keys: ready  # this instance only, for the two timings below
    try:
        with torch.autocast(batch["image"].device.type, torch.bfloat16, enabled=trainee.autocast):
            forward = median(lambda: module.training_step(batch, 0))
        step = median(lambda: trainee.step(batch))
    finally:
        del module.batch_targets
    return {"teacher targets": teacher, "student forward + loss": forward,
            "student backward + AdamW": max(step - forward, 0.0)}


def ratio(runs: list[Timing], naive: list[Timing], field: str) -> str:
    """Median over repeats of ours / naive from the same round, with the range."""
    ratios = sorted(getattr(a, field) / getattr(b, field) for a, b in zip(runs, naive, strict=True))
    return f"{statistics.median(ratios):.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks than the model has (short CPU runs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-artifacts", action="store_true", help="the artifact-free row")
    parser.add_argument("--only", default=None, help="run only this configuration of ours (and the naive loop)")
    parser.add_argument("--student-bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast our student step to bf16 (default: on with CUDA); the naive loop stays fp32")
    parser.add_argument("--grad-checkpointing", action="store_true", help="our student recomputes activations")
    parser.add_argument("--epoch-batches", type=int, default=3, help="batches per epoch in the cache measurement")
    parser.add_argument("--project-images", type=int, default=30_000)
    parser.add_argument("--project-epochs", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator bf16 peak, for MFU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    student_bf16 = args.device == "cuda" if args.student_bf16 is None else args.student_bf16

    teacher = build_teacher(args.model, args.img_size, args.depth, not args.no_artifacts, args.device)
    p = patch_size(teacher)[0]
    grid = grid_size(teacher, args.img_size, args.img_size)
    margin = view_margin(teacher, args.img_size)
    batch = make_batch(teacher, args.batch, args.img_size, margin)
    center = crop_center(batch["image"], margin * p)
    clean = teacher if args.no_artifacts else build_teacher(args.model, args.img_size, args.depth, False, args.device)
    with torch.no_grad():
        reference = patch_features(clean, center)
        mask = outlier_mask(patch_features(teacher, center))
    del clean

    ours = {"grad_checkpointing": args.grad_checkpointing}
    chosen = {k: v | ours for k, v in configs().items() if args.only in (None, k)}
    trainees = {"naive": Trainee.build(NaiveModule, teacher, batch, margin)}
    trainees |= {k: Trainee.build(RetrofitModule, teacher, batch, margin, student_bf16, **s) for k, s in chosen.items()}
    for trainee in trainees.values():  # warm-up: allocator, oneDNN kernels
        trainee.step(batch)
    results = interleaved({k: (lambda t=t: t.step(batch)) for k, t in trainees.items()}, args.repeats, args.device)

    print(f"model {args.model} depth {len(teacher.blocks)} at {args.img_size} px ({grid[0]}x{grid[1]} grid, "
          f"margin {margin}), batch {args.batch}, artifacts {'no' if args.no_artifacts else 'yes'} "
          f"({100 * mask.float().mean():.2f}% of tokens), student bf16 {student_bf16}, grad checkpointing "
          f"{args.grad_checkpointing}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.repeats} interleaved repeats")
    naive = results["naive"]
    flops = {k: step_flops(t, batch) for k, t in trainees.items()}
    peak = peak_tflops(args.device, args.peak_tflops)
    print("| run | wall s/step median [min-max] | images/s | wall ratio to naive | CPU-time ratio to naive "
          "| peak step MiB | TFLOP/step | achieved TFLOP/s | MFU | teacher s/image "
          "| target cos all / artifacts / outliers left |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        median = statistics.median(r.seconds for r in runs)
        achieved = flops[name] / median / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {spread([r.seconds for r in runs])} | {args.batch / median:.2f} "
              f"| {ratio(runs, naive, 'seconds')} | {ratio(runs, naive, 'cpu')} | {max(r.peak for r in runs):.0f} "
              f"| {flops[name] / 1e12:.3f} | {achieved:.3f} | {mfu} "
              f"| {quality_row(trainees[name], reference, mask, batch, args.repeats, args.device)} |")

    if "default" in trainees:
        parts = phases(trainees["default"], batch, args.repeats, args.device)
        total = sum(parts.values())
        print("\n| phase of a default step | s | share |\n|---|---|---|")
        for name, seconds in parts.items():
            print(f"| {name} | {seconds:.3f} | {100 * seconds / total:.0f}% |")

    del trainees
    for name in (n for n in ("default", PREVIOUS) if n in chosen):
        first, later = cache_epochs(teacher, chosen[name], args, margin, student_bf16)
        ratios = sorted(b / a for a, b in zip(first, later, strict=True))
        print(f"\ncache ({name}, {args.epoch_batches} batches per epoch): first epoch {spread(first)} s/image, "
              f"later epoch {spread(later)} s/image, later / first {statistics.median(ratios):.2f} "
              f"[{ratios[0]:.2f}-{ratios[-1]:.2f}]")
        per_image = statistics.median(first) + (args.project_epochs - 1) * statistics.median(later)
        seconds = args.project_images * per_image
        print(f"projected: {args.project_images} images x {args.project_epochs} epochs with the cache = "
              f"{seconds / 3600:.2f} h on this device")

if __name__ == "__main__":
    main()
