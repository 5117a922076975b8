"""`retrofit` console script: fit, diagnose, eval, export, demo and recipes over the library's own functions.

``fit`` is a LightningCLI over :class:`RetrofitModule` and :class:`RetrofitDataModule` (config files or
recipe names, dotted overrides, ``--print_config``, the resolved config saved beside the run). Every other
command is a plain function below that jsonargparse's ``auto_cli`` turns into a subcommand from its typed
signature and docstring, as litgpt does. All parsers refuse abbreviated options and report a bad
configuration as one line naming the field (with the nearest option for a typo), before any model is built.
"""

from __future__ import annotations

import difflib
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, auto_cli, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table
from torch import nn

from . import __version__
from .backbones import load_backbone
from .callbacks import RegisterExport, StepProgressBar
from .data import RetrofitDataModule
from .demo import run_demo
from .diagnose import REPORT_NAME, diagnose, render_table
from .errors import RetrofitError
from .evaluate import box_dataset, evaluate_lost, evaluate_probe, mask_dataset
from .features import square_size
from .files import write_json
from .images import list_images, load_images
from .module import RetrofitModule
from .recipes import recipe_path, recipe_paths, recipes_dir, resolve_config, trainable_parameters
from .surgery import count_registers

console = Console()

# ---- parsing ------------------------------------------------------------------------------------------


class OneLineErrors:
    """Parser mixin: every jsonargparse error becomes one RetrofitError line; an unknown option gets the nearest."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        text = " ".join(message.split())
        words = text.split()
        if text.startswith("unrecognized arguments:") and len(words) > 2:
            close = difflib.get_close_matches(words[2].split("=")[0], parser._option_string_actions, n=1)
            text += f"; did you mean {close[0]}?" if close else ""
        prog = parser.prog.replace(" [options]", "")
        raise RetrofitError(f"invalid configuration: {text} (`{prog} --help` lists the options).")


class CommandParser(OneLineErrors, ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


class FitParser(OneLineErrors, LightningArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})


class RecipeOrFile(ActionConfigFile):
    """``--config`` takes a YAML/JSON file or the name of a shipped recipe (``retrofit recipes``)."""

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: str, option_string: str | None = None):
        super().__call__(parser, cfg, resolve_config(values), option_string)


# ---- fit ----------------------------------------------------------------------------------------------


class RetrofitCLI(LightningCLI):
    """``retrofit fit``: LightningCLI with the retrofit classes, step progress, metrics.csv and a final export.

    With ``instantiate=False`` it only parses and validates (recipes are checked this way, no model built).
    """

    def __init__(self, args: Sequence[str], instantiate: bool = True) -> None:
        self._instantiate = instantiate
        super().__init__(
            RetrofitModule,
            RetrofitDataModule,
            trainer_defaults={"max_steps": 1000, "callbacks": [StepProgressBar()]},  # as retrofit() defaults
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "retrofit fit",
                "description": "Retrofit register tokens into a timm ViT by self-distillation from its frozen "
                "original. Start from a recipe: retrofit fit --config NAME --data.source DIR.",
            },
            args=list(args),
            run=False,
            auto_configure_optimizers=False,  # RetrofitModule sets its own per-group AdamW and schedule
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", [f"retrofit=={__version__}", f"lightning.pytorch=={L.__version__}"])
        parser = FitParser(**kwargs)
        parser.add_argument("-c", "--config", action=RecipeOrFile,
                            help="A recipe name (see `retrofit recipes`) or a YAML/JSON config file.")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training from this Lightning checkpoint (written by an earlier fit).")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Where the timm-native model is written at the end (default: <log_dir>/model).")

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        self.config = parser.parse_args(args)  # `args` is the command line here: no "both given" warning

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()
            add_metrics_csv(self.trainer)


def add_metrics_csv(trainer: L.Trainer) -> None:
    """Log to ``metrics.csv`` in the run folder as well, whatever other logger the run has (none: nothing)."""
    loggers = trainer.loggers
    if loggers and not any(isinstance(logger, CSVLogger) for logger in loggers):
        first = loggers[0]
        trainer.loggers = [*loggers, CSVLogger(first.save_dir, name=first.name, version=first.version)]
        # It shares the first logger's version folder on purpose, so its "folder is not empty" warning says nothing.
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def fit_config(args: Sequence[str]) -> Namespace:
    """The resolved ``retrofit fit`` configuration for ``args``, validated without building anything."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0" says nothing here
    seed_log.disabled = True
    try:
        return RetrofitCLI(args, instantiate=False).config
    finally:
        seed_log.disabled = False


def fit(args: Sequence[str]) -> Path:
    """Retrofit registers into a model by self-distillation (LightningCLI: --config NAME, dotted overrides).

    Trains as configured, then exports; returns the export directory (also printed).
    """
    cli = RetrofitCLI(args)
    trainer = cli.trainer
    out = Path(cli.config.export_dir or Path(trainer.log_dir or trainer.default_root_dir) / "model")
    trainer.callbacks.append(RegisterExport(out))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    console.print(f"retrofitted model: [bold]{out}[/] (config and checkpoints in {trainer.log_dir})", soft_wrap=True)
    return out


# ---- models and images --------------------------------------------------------------------------------


def _label(spec: str) -> str:
    return Path(spec).name or spec


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
) -> dict[str, Any]:
    """Measure a model's artifacts: per-layer norm table, diagnose.json and one PNG of maps per image.

    Args:
        model: timm name, export directory, or timm name with --checkpoint (see retrofit.load_backbone).
        images: folder of images (searched recursively).
        out: folder for diagnose.json and the PNGs.
        compare: a second model shown beside the first (e.g. the original vs the retrofitted one).
        checkpoint: local weights file for a timm name in MODEL.
        compare_checkpoint: local weights file for a timm name in --compare.
        img_size: square input size (default: the model's own).
        max_images: use the first N images of the folder.
        k: outlier factor: norm above k x (or below 1/k x) the image median.
        threshold: absolute norm threshold for high-norm outliers instead of k (e.g. 150 as in Darcet et al.).
        layers: block indices to measure (default: all).
        batch_size: images per forward.
    """
    first = load_backbone(model, checkpoint)
    second = None if compare is None else load_backbone(compare, compare_checkpoint)
    paths = list_images(images)[:max_images]
    batch = load_images(paths, square_size(first, img_size), first)
    labels = (_label(model), _label(compare or ""))
    labels = labels if compare is None or labels[0] != labels[1] else ("model", "compare")
    names = [p.relative_to(images).as_posix() for p in paths]
    report = diagnose(first, batch, out, second, k=k, layers=layers, names=names, labels=labels,
                      threshold=threshold, batch_size=batch_size, progress=True)
    console.print(render_table(report))
    console.print(f"wrote {Path(out) / REPORT_NAME} and {len(report['figures'])} figures to {out}", soft_wrap=True)
    return report


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
    """
    backbone = load_backbone(model, checkpoint)
    data = box_dataset(dataset, boxes, box_format, split)
    result = evaluate_lost(backbone, data, img_size=img_size, k=k, batch_size=batch_size, progress=True)
    return _report(f"LOST on {dataset}", result, out, ("corloc", "n", "skipped"))


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
    """
    backbone = load_backbone(model, checkpoint)
    result = evaluate_probe(backbone, mask_dataset(train), mask_dataset(val), num_classes, epochs=epochs, lr=lr,
                            img_size=img_size, batch_size=batch_size, seed=seed, progress=True)
    return _report(f"Linear probe on {val}", result, out, ("miou", "accuracy", "train_loss", "n_train", "n_val"))


def export_command(checkpoint: str, *, out: str, backbone: str | None = None, overwrite: bool = False) -> Path:
    """Turn a training checkpoint (.ckpt from fit) into a timm-native model directory (LoRA merged).

    Args:
        checkpoint: Lightning .ckpt written by retrofit fit.
        out: directory to write (model.safetensors + config.json); timm.create_model('local-dir:OUT') reads it.
        backbone: timm name of the original model, when the run started from a Python model object.
        overwrite: replace an existing non-empty OUT.
    """
    module, step = RetrofitModule.from_checkpoint(checkpoint, backbone)
    path = module.export(out, overwrite=overwrite, step=step)
    registers = count_registers(module.student_vit)
    console.print(f"exported {path} ({registers} registers in total, step {step})", soft_wrap=True)
    return path


def demo_command(out: str = "demo_out", steps: int = 100, num_images: int = 48, overwrite: bool = True) -> dict:
    """Offline demo: retrofit a small ViT with planted (synthetic) artifacts; before/after maps and numbers.

    Args:
        out: folder for maps/ (before/after PNGs), metrics.json and model/ (the timm-native export).
        steps: training steps (fewer: faster, less clean).
        num_images: synthetic training images to make.
        overwrite: replace the results of an earlier demo in OUT.
    """
    return run_demo(out, steps=steps, num_images=num_images, overwrite=overwrite, console=console)


# ---- recipes ------------------------------------------------------------------------------------------


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def recipe_summary(path: Path) -> dict[str, str]:
    """What a recipe trains, read through fit's own parser (so it is validated) and counted on the meta device."""
    config = fit_config(["--config", str(path), "--data.source", "."])
    trainable, total = trainable_parameters(config.model)
    return {
        "recipe": path.stem,
        "backbone": config.model.backbone,
        "registers": str(config.model.num_registers),
        "px": str(config.data.img_size),
        "lr": f"{_short(config.model.lr)} -> {_short(config.model.min_lr)}",
        "batch": str(config.data.batch_size),
        "steps": str(config.trainer.max_steps),
        "trainable params": f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M",
    }


def _summary_table(rows: list[dict[str, str]]) -> Table:
    """Two columns, so a narrow terminal wraps a recipe's settings between words, never inside a name."""
    table = Table.grid(padding=(0, 2, 1, 0))
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for row in rows:
        table.add_row(row["recipe"], f"{row['backbone']}\n{row['registers']} registers, {row['px']} px, "
                      f"lr {row['lr']}, batch {row['batch']}, {row['steps']} steps; "
                      f"trains {row['trainable params']} parameters")
    return table


def recipes_command(markdown: bool = False) -> list[dict[str, str]]:
    """List the shipped training recipes: backbone, settings and trainable parameters of each.

    Args:
        markdown: print a Markdown table instead (the one in recipes/README.md).
    """
    rows = [recipe_summary(p) for p in recipe_paths()]
    if markdown:
        print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
        for row in rows:
            print("| " + " | ".join(f"`{v}`" if k in ("recipe", "backbone") else v for k, v in row.items()) + " |")
        return rows
    console.print(f"{len(rows)} recipes in {recipes_dir()}", soft_wrap=True)
    console.print("Train with one: retrofit fit --config NAME --data.source DIR\n"
                  "Show one:       retrofit recipe NAME\n")
    console.print(_summary_table(rows))
    return rows


def recipe_command(name: str) -> dict[str, str]:
    """Show one training recipe: its YAML (every key commented) and what it trains.

    Args:
        name: the recipe's name, as `retrofit recipes` lists it.
    """
    path = recipe_path(name)
    row = recipe_summary(path)
    console.print(f"# {path}", style="dim", soft_wrap=True)
    console.print(path.read_text(), markup=False, highlight=False, soft_wrap=True)  # the terminal wraps, not us
    console.print(_summary_table([row]))
    return row


COMMANDS: dict[str, Any] = {
    "fit": fit,  # listed in `retrofit --help`; main() hands fit's arguments to RetrofitCLI
    "diagnose": diagnose_command,
    "eval": {"_help": "Downstream evaluation of dense features: eval lost | eval probe.",
             "lost": eval_lost_command, "probe": eval_probe_command},
    "export": export_command,
    "demo": demo_command,
    "recipes": recipes_command,
    "recipe": recipe_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors print as one line (no traceback) and exit with status 1."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    # Field docstrings (TargetSettings) reach --help; a backbone is a name or a path, never an nn.Module class path.
    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_disabled=[nn.Module])
    try:
        if args[0] == "fit":
            fit(args[1:])
        else:
            auto_cli(COMMANDS, args=args, parser_class=CommandParser, prog="retrofit", version=__version__,
                     description="Give a pretrained timm ViT register tokens after the fact.")
    except RetrofitError as e:
        print(f"retrofit: error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, --version and --print_config exit through argparse
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
