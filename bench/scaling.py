"""How a training step scales with resolution and number of views, and what the targets cost against the student.

    python bench/scaling.py --model vit_small_patch14_dinov2 --depth 2 --batch 2 --threads 1

For each resolution and view count: seconds per image of the denoised targets alone (``DenoisedTargets``)
and of the full step (targets + student forward/backward + AdamW, ``RetrofitModule.training_step``),
the targets' share of the step, and the step's peak memory. All views are always drawn
(``min_clean_views=0``) so the view count is what the teacher really runs.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import Trainee, build_teacher, interleaved, make_batch, view_margin

from retrofit.features import grid_size
from retrofit.module import RetrofitModule
from retrofit.targets import TargetSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 518])
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="teacher views (and, with CUDA, the student) in bf16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"model {args.model} depth {args.depth}, planted artifacts, batch {args.batch}, teacher bf16 {args.bf16}, "
          f"device {args.device}, threads {torch.get_num_threads()}, median of {args.repeats} interleaved repeats")
    print("| px | grid | views | targets s/image | step s/image | targets share of step | peak step MiB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        teacher = build_teacher(args.model, size, args.depth, True, args.device)
        grid = grid_size(teacher, size, size)[0]
        margin = view_margin(teacher, size)
        batch = make_batch(teacher, args.batch, size, margin)
        for views in args.views:
            settings = TargetSettings(num_views=views, bf16=args.bf16, min_clean_views=0, mask_outliers=False)
            trainee = Trainee.build(RetrofitModule, teacher, batch, margin, args.bf16 and args.device == "cuda",
                                    targets=settings, register_neurons=None)
            trainee.step(batch)  # warm-up
            runs = interleaved({"targets": lambda t=trainee, b=batch, m=margin: t.module.targets(b["image"], m),
                                "step": lambda t=trainee, b=batch: t.step(b)}, args.repeats, args.device)
            t = statistics.median(r.seconds for r in runs["targets"]) / args.batch
            s = statistics.median(r.seconds for r in runs["step"]) / args.batch
            print(f"| {size} | {grid}x{grid} | {views} | {t:.3f} | {s:.3f} | {100 * t / s:.0f}% "
                  f"| {max(r.peak for r in runs['step']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
