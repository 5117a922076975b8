"""Retrofit inside your own Lightning Trainer, with retrofit's callbacks watching the artifacts.

    python examples/lightning_callbacks.py vit_small_patch14_dinov2.lvd142m ~/photos runs/mine --steps 1000

ArtifactMonitor logs outlier fraction, norm statistics and fidelity on a fixed probe batch (and can stop
the run once the artifacts are gone); NormMapLogger writes norm / CLS-attention / PCA maps as training
goes; RegisterExport writes the timm-native model at the end. The callbacks read ``student``,
``teacher``, ``targets`` and ``export_model()`` from the module, so they also work on your own module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

from retrofit.callbacks import ArtifactMonitor, NormMapLogger, RegisterExport, StepProgressBar
from retrofit.data import RetrofitDataModule
from retrofit.module import RetrofitModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", help="timm model name, or a retrofit export directory")
    parser.add_argument("images", help="folder of unlabeled images")
    parser.add_argument("out", help="run directory: logs, norm maps and model/")
    parser.add_argument("--checkpoint", help="local weights for a timm name (offline)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="measure and draw maps every N steps")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    out = Path(args.out)
    module = RetrofitModule(args.backbone, checkpoint=args.checkpoint, num_registers=4)  # freeze="auto"
    data = RetrofitDataModule(args.images, img_size=args.img_size, batch_size=args.batch_size, num_workers=0)
    monitor = ArtifactMonitor(every_n_steps=args.every, stop_outlier_fraction=0.001, stop_fidelity=0.95)
    callbacks = [
        monitor,
        NormMapLogger(every_n_steps=args.every, out_dir=out / "norm_maps"),
        RegisterExport(out / "model"),
        StepProgressBar(),  # the run's steps, with the time left (Lightning's bar counts one epoch)
    ]
    trainer = L.Trainer(max_steps=args.steps, callbacks=callbacks, default_root_dir=out, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)

    first, last = monitor.history[0], monitor.history[-1]
    for name in ("outlier_high", "fidelity_mean"):
        print(f"{name}: step {first['step']} {first[name]:.4f} -> step {last['step']} {last[name]:.4f}")
    print(f"model: {out / 'model'}; maps: {out / 'norm_maps'}")


if __name__ == "__main__":
    main()
