"""Diagnose a retrofitted model next to its original, then compare them on LOST object discovery.

    python examples/diagnose_and_evaluate.py vit_small_patch14_dinov2.lvd142m dinov2_s_reg4 ~/photos \
        --boxes ~/photos/boxes.json --out diagnose_out

``diagnose`` writes a per-layer norm table, diagnose.json and one PNG per image (input, norm map with
outliers circled, CLS attention, PCA; one row per model). With ``--boxes`` (a JSON
``{"relative/path.jpg": [[x0, y0, x1, y1], ...]}``) both models are scored by LOST CorLoc.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from retrofit import load_backbone
from retrofit.diagnose import diagnose, render_table
from retrofit.evaluate import box_dataset, evaluate_lost
from retrofit.images import list_images, load_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", help="the model before retrofitting (timm name or export directory)")
    parser.add_argument("retrofitted", help="the retrofitted export directory")
    parser.add_argument("images", help="folder of images")
    parser.add_argument("--checkpoint", help="local weights for a timm name in ORIGINAL (offline)")
    parser.add_argument("--boxes", help="boxes JSON for LOST CorLoc")
    parser.add_argument("--out", default="diagnose_out")
    parser.add_argument("--max-images", type=int, default=8)
    args = parser.parse_args(argv)

    console = Console()
    original = load_backbone(args.original, args.checkpoint)
    retrofitted = load_backbone(args.retrofitted)
    size = retrofitted.patch_embed.img_size[0]
    images = load_images(list_images(args.images)[: args.max_images], size, original)
    report = diagnose(original, images, out_dir=args.out, compare=retrofitted, labels=("original", "retrofitted"))
    console.print(render_table(report))
    for summary in report["models"]:
        last = summary["layers"][-1]
        console.print(f"{summary['label']}: {100 * last['high']:.2f}% high-norm outliers in the last layer")

    if args.boxes:
        data = box_dataset(args.images, args.boxes)
        for label, model in (("original", original), ("retrofitted", retrofitted)):
            result = evaluate_lost(model, data, img_size=size, progress=True)
            console.print(f"{label}: LOST CorLoc {result['corloc']:.3f} on {result['n']} images")


if __name__ == "__main__":
    main()
