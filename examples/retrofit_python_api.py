"""Retrofit register tokens into a timm ViT from Python, on a folder of your own images.

    python examples/retrofit_python_api.py vit_small_patch14_dinov2.lvd142m ~/photos dinov2_s_reg4 \
        --img-size 224 --steps 1000

The result is an ordinary timm model: ``timm.create_model("local-dir:dinov2_s_reg4", pretrained=True)``
loads it anywhere, no retrofit needed. Offline, pass ``--checkpoint FILE.safetensors`` with a timm name,
or a directory written by ``retrofit export`` as the backbone.
"""

from __future__ import annotations

import argparse

import timm
import torch

from retrofit import count_registers, patch_features, retrofit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", help="timm model name, or a retrofit export directory")
    parser.add_argument("images", help="folder of unlabeled images")
    parser.add_argument("out", help="where the timm-native model is written")
    parser.add_argument("--checkpoint", help="local weights for a timm name (offline)")
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--img-size", type=int, help="training resolution (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    optional = {"checkpoint": args.checkpoint, "img_size": args.img_size}
    model = retrofit(
        args.backbone,
        args.images,
        out_dir=args.out,
        overwrite=True,
        num_registers=args.registers,
        max_steps=args.steps,
        batch_size=args.batch_size,
        **{k: v for k, v in optional.items() if v is not None},
    )

    # Plain timm reads the export back: same outputs, no retrofit code involved.
    reloaded = timm.create_model(f"local-dir:{args.out}", pretrained=True).eval()
    size = args.img_size or reloaded.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        same = torch.allclose(patch_features(model, x), patch_features(reloaded, x), atol=1e-5)
    print(f"{args.out}: {count_registers(reloaded)} registers; timm reload gives identical features: {same}")


if __name__ == "__main__":
    main()
