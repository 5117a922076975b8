"""`retrofit` console script: fit, diagnose, eval, export, demo and recipes over the library's own functions.

``fit`` is a LightningCLI over :class:`RetrofitModule` and :class:`RetrofitDataModule` (config files,
dotted overrides, ``--print_config``, the resolved config saved beside the run). The other subcommands
are jsonargparse parsers built from the typed signatures and docstrings of the ``*_command`` functions
below, so ``--help`` documents every option and ``--config`` works everywhere. Every configuration
error is reported as one line naming the field, before any model is built.
"""

from __future__ import annotations

import inspect
import logging
import re
import shlex
import sys
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_type_hints

import docstring_parser
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from . import __version__
from .backbones import load_backbone
from .callbacks import RegisterExport
from .data import RetrofitDataModule
from .demo import run_demo
from .diagnose import REPORT_NAME, diagnose, render_table
from .errors import RetrofitError, first_line
from .evaluate import box_dataset, evaluate_lost, evaluate_probe, mask_dataset
from .faults import continue_run, explain_stops, fault_callbacks
from .features import square_size
from .files import write_json
from .images import ImageLog, list_images, load_readable
from .module import RetrofitModule

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
console = Console()

# ---- errors -------------------------------------------------------------------------------------------

_REWRITES = (
    (r"Group '([^']+)' does not accept option '([^']+)'", r"\1.\2: unknown key"),
    (r"unrecognized arguments: (\S+).*", r"\1: unknown option"),
    (r'Parser key "([^"]+)":', r"\1:"),
    (r'Key "([^"]+)" is required but not included in config object or its value is None\.?', r"\1: required"),
    (r"Expected a typing\.Literal\[(.*?)\]\.", r"expected one of \1,"),
    (r"Expected a <class '([\w.]+)'>\.", r"expected \1,"),
    (r"Got value: ", "got "),
)


def config_error(message: str, prog: str) -> RetrofitError:
    """jsonargparse's multi-line message as one line that starts with the offending field."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement, text)
    text = text if len(text) <= 240 else text[:237] + "..."
    return RetrofitError(f"invalid configuration: {text} (run `{prog} --help` for the options).")


def _parse(parser: ArgumentParser, args: Sequence[str]) -> Namespace:
    try:
        return parser.parse_args(list(args))
    except ArgumentError as e:
        raise config_error(str(e), parser.prog) from None


# ---- fit ----------------------------------------------------------------------------------------------


class RetrofitCLI(LightningCLI):
    """``retrofit fit``: LightningCLI with the retrofit classes, a rich progress bar and a final export.

    With ``instantiate=False`` it only parses and validates (recipes are checked this way, no model built).
    """

    def __init__(self, args: Sequence[str], instantiate: bool = True) -> None:
        self._instantiate = instantiate
        super().__init__(
            RetrofitModule,
            RetrofitDataModule,
            trainer_defaults={"callbacks": [RichProgressBar()]},
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "retrofit fit",
                "exit_on_error": False,
                "description": "Retrofit register tokens into a timm ViT by self-distillation from its frozen "
                "original. Start from a recipe: retrofit fit --config recipes/NAME.yaml --data.source DIR.",
            },
            args=list(args),
            run=False,
            auto_configure_optimizers=False,  # RetrofitModule sets its own per-group AdamW and schedule
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training from this Lightning checkpoint (written by an earlier fit).")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Where the timm-native model is written at the end (default: <log_dir>/model).")

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        self.config = _parse(parser, args)

    def instantiate_classes(self) -> None:
        if self._instantiate:
            super().instantiate_classes()


def fit_config(args: Sequence[str]) -> Namespace:
    """The resolved ``retrofit fit`` configuration for ``args``, validated without building anything."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0" says nothing here
    seed_log.disabled = True
    try:
        return RetrofitCLI(args, instantiate=False).config
    finally:
        seed_log.disabled = False


def fit(args: Sequence[str], prog: str = "retrofit fit") -> Path:
    """Train as configured, then export; returns the export directory (also printed).

    ``prog`` is part of the subcommand calling convention; the parser names itself ``retrofit fit``.
    """
    cli = RetrofitCLI(args)
    trainer = cli.trainer
    continue_run(trainer, cli.config.ckpt_path)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    out = Path(cli.config.export_dir or log_dir / "model")
    resume = f"retrofit fit --config {shlex.quote(str(log_dir / 'config.yaml'))} --ckpt_path {{ckpt}}"
    trainer.callbacks = [*fault_callbacks(resume), *trainer.callbacks, RegisterExport(out)]
    with explain_stops(trainer):
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    console.print(f"retrofitted model: [bold]{out}[/] (config and checkpoints in {trainer.log_dir})")
    return out


# ---- models and images --------------------------------------------------------------------------------


def _label(spec: str) -> str:
    return Path(spec).name or spec


def diagnose_command(
    model: str,
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
        max_images: use the first N readable images of the folder (unreadable ones are skipped and counted).
        k: outlier factor: norm above k x (or below 1/k x) the image median.
        threshold: absolute norm threshold for high-norm outliers instead of k (e.g. 150 as in Darcet et al.).
        layers: block indices to measure (default: all).
        batch_size: images per forward.
    """
    first = load_backbone(model, checkpoint)
    second = None if compare is None else load_backbone(compare, compare_checkpoint)
    size = square_size(first, img_size)
    unusable = ImageLog()
    batch, paths = load_readable(list_images(images), size, first, max_images, Path(images), unusable)
    labels = (_label(model), _label(compare or ""))
    labels = labels if compare is None or labels[0] != labels[1] else ("model", "compare")
    names = [p.relative_to(images).as_posix() for p in paths]
    report = diagnose(first, batch, out, second, k=k, layers=layers, names=names, labels=labels,
                      threshold=threshold, batch_size=batch_size, progress=True)
    console.print(render_table(report))
    _print_unusable(unusable)
    console.print(f"wrote {Path(out) / REPORT_NAME} and {len(report['figures'])} figures to {out}")
    return report


def _print_unusable(log: ImageLog) -> None:
    """The one-line account of skipped (and converted) images, as fit reports them."""
    if (line := log.summary()) is not None:
        console.print(line, highlight=False, soft_wrap=True)


def _result_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in values.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _report(title: str, result: dict[str, Any], out: str | None, shown: Sequence[str]) -> dict[str, Any]:
    console.print(_result_table(title, {k: result[k] for k in shown}))
    if out is not None:
        console.print(f"wrote {write_json(result, out)}")
    return result


def eval_lost_command(
    model: str,
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
    _print_unusable(data.log)
    return _report(f"LOST on {dataset}", result, out, ("corloc", "n", "skipped", "unreadable"))


def eval_probe_command(
    model: str,
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
    train_set, val_set = mask_dataset(train), mask_dataset(val)
    result = evaluate_probe(backbone, train_set, val_set, num_classes, epochs=epochs, lr=lr,
                            img_size=img_size, batch_size=batch_size, seed=seed, progress=True)
    for data in (train_set, val_set):
        _print_unusable(data.log)
    return _report(f"Linear probe on {val}", result, out,
                   ("miou", "accuracy", "train_loss", "n_train", "n_val", "unreadable"))


# ---- export -------------------------------------------------------------------------------------------


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by ``fit`` (weights-only load: no code in it runs)."""
    path = Path(path)
    if not path.is_file():
        raise RetrofitError(f"checkpoint {path} does not exist: pass a .ckpt written by retrofit fit "
                            "(<log_dir>/checkpoints).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RetrofitError(f"{path} is not a readable Lightning checkpoint ({type(e).__name__}): "
                            "pass a .ckpt written by retrofit fit.") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise RetrofitError(f"{path} has no state_dict and hyper_parameters: pass a .ckpt written by retrofit fit.")
    return ckpt


def module_from_checkpoint(path: str | Path, backbone: str | None = None) -> tuple[RetrofitModule, dict[str, Any]]:
    """The trained RetrofitModule of a ``fit`` checkpoint, rebuilt offline, and the checkpoint itself.

    The teacher is only an architecture here (no download): the checkpoint holds every student weight.
    ``backbone`` names the architecture when the run was started from an in-memory model (Python API).
    """
    ckpt = read_training_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    spec = backbone or hp.get("backbone")
    if not isinstance(spec, str):
        raise RetrofitError(f"{path} does not name its backbone (trained from a Python model): pass --backbone NAME.")
    architecture = load_backbone(spec, pretrained=False, **(hp.get("model_kwargs") or {}))
    try:
        module = RetrofitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, backbone=architecture)
    except RuntimeError as e:  # load_state_dict's size mismatch / missing keys
        raise RetrofitError(
            f"{path} does not fit a {spec} student with these settings ({first_line(e, 120)}): "
            "pass the --backbone it was trained from."
        ) from e
    module.hparams["backbone"] = spec  # the export records where it came from
    return module, ckpt


def export_command(checkpoint: str, out: str, backbone: str | None = None, overwrite: bool = False) -> Path:
    """Turn a training checkpoint (.ckpt from fit) into a timm-native model directory (LoRA merged).

    Args:
        checkpoint: Lightning .ckpt written by retrofit fit.
        out: directory to write (model.safetensors + config.json); timm.create_model('local-dir:OUT') reads it.
        backbone: timm name of the original model, when the run started from a Python model object.
        overwrite: replace an existing non-empty OUT.
    """
    module, ckpt = module_from_checkpoint(checkpoint, backbone)
    step = int(ckpt.get("global_step", 0))
    path = module.export(out, overwrite=overwrite, step=step)
    console.print(f"exported {path} ({module.hparams.num_registers} registers, step {step})")
    return path


# ---- demo ---------------------------------------------------------------------------------------------


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


def recipe_paths(folder: str | Path = RECIPES_DIR) -> list[Path]:
    paths = sorted(Path(folder).glob("*.yaml"))
    if not paths:
        raise RetrofitError(f"no recipes (*.yaml) in {folder}: pass --dir pointing at the recipes folder.")
    return paths


def _find_recipe(name: str, folder: str | Path) -> Path:
    paths = {p.stem: p for p in recipe_paths(folder)}
    if name not in paths:
        raise RetrofitError(f"no recipe {name!r} in {folder}: choose one of {', '.join(paths)}.")
    return paths[name]


def trainable_parameters(config: Namespace) -> tuple[int, int]:
    """(trainable, total) student parameters of a fit config, built on the meta device (no memory, no weights).

    The student is built by RetrofitModule itself, so the count is what the freeze preset really trains.
    The classifier head is left out of the total: it never reaches the patch features.
    """
    model = config.model
    settings = {k: v for k, v in model.as_dict().items() if k not in ("backbone", "checkpoint", "model_kwargs")}
    with torch.device("meta"):
        arch = load_backbone(model.backbone, pretrained=False, **{"num_classes": 0, **(model.model_kwargs or {})})
        student = RetrofitModule(arch, **settings).student
    params = list(student.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def _recipe_row(path: Path, params: bool) -> dict[str, str]:
    config = fit_config(["--config", str(path), "--data.source", "."])
    row = {
        "recipe": path.stem,
        "backbone": config.model.backbone,
        "registers": str(config.model.num_registers),
        "px": str(config.data.img_size),
        "lr": f"{_short(config.model.lr)} -> {_short(config.model.min_lr)}",
        "batch": str(config.data.batch_size),
        "steps": str(config.trainer.max_steps),
    }
    if params:
        trainable, total = trainable_parameters(config)
        row["trainable params"] = f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M"
    return row


def recipes_command(name: str | None = None, params: bool = False, markdown: bool = False,
                    dir: str = str(RECIPES_DIR)) -> list[dict[str, str]]:
    """List the training recipes as a table (validated against fit's parser), or show one recipe.

    Args:
        name: show this recipe's YAML instead of the table.
        params: count each recipe's trainable parameters (builds each architecture on the meta device).
        markdown: print the table as Markdown (for recipes/README.md).
        dir: folder holding the recipe YAML files.
    """
    if name is not None:
        path = _find_recipe(name, dir)
        fit_config(["--config", str(path), "--data.source", "."])  # validate what is shown
        console.print(Syntax(path.read_text(), "yaml"))
        return [_recipe_row(path, params)]
    rows = [_recipe_row(p, params) for p in recipe_paths(dir)]
    if markdown:
        columns = list(rows[0])
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for row in rows:
            print("| " + " | ".join(f"`{v}`" if k in ("recipe", "backbone") else v for k, v in row.items()) + " |")
        return rows
    table = Table(title=f"Recipes in {dir} (use: retrofit fit --config {dir}/NAME.yaml --data.source DIR)")
    for column in rows[0]:
        text = column in ("recipe", "backbone")
        table.add_column(column, justify="left" if text else "right", no_wrap=column == "recipe", overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    return rows


# ---- dispatch -----------------------------------------------------------------------------------------


def _doc_summary(fn: Callable[..., Any]) -> str:
    return inspect.getdoc(fn).split("\n\n")[0].replace("\n", " ")


def _function_parser(fn: Callable[..., Any], prog: str) -> ArgumentParser:
    """Options from ``fn``'s typed signature and docstring; a first parameter without a default value
    (or defaulting to None) is the positional argument (MODEL, CHECKPOINT, recipe NAME)."""
    parser = ArgumentParser(prog=prog, description=_doc_summary(fn), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file with any of the options below.")
    first = next(iter(inspect.signature(fn).parameters.values()))
    if first.default not in (inspect.Parameter.empty, None):
        parser.add_function_arguments(fn)
        return parser
    helps = {p.arg_name: p.description for p in docstring_parser.parse(inspect.getdoc(fn)).params}
    parser.add_argument(first.name, type=get_type_hints(fn)[first.name], help=helps.get(first.name),
                        nargs=None if first.default is inspect.Parameter.empty else "?")
    parser.add_function_arguments(fn, skip={first.name})
    return parser


def _run_function(fn: Callable[..., Any], args: Sequence[str], prog: str) -> Any:
    config = _parse(_function_parser(fn, prog), args)
    return fn(**{k: v for k, v in config.as_dict().items() if k != "config"})


Runner = Callable[[Sequence[str], str], Any]
EVAL_COMMANDS: dict[str, tuple[str, Runner]] = {
    "lost": (_doc_summary(eval_lost_command), partial(_run_function, eval_lost_command)),
    "probe": (_doc_summary(eval_probe_command), partial(_run_function, eval_probe_command)),
}


def _dispatch(commands: dict[str, tuple[str, Runner]], args: Sequence[str], prog: str) -> Any:
    """Run the subcommand named by ``args[0]``; without one, print what there is."""
    if not args or args[0] in ("-h", "--help"):
        table = Table(title=f"{prog} <command> --help documents every option", show_header=False, box=None)
        for name, (summary, _) in commands.items():
            table.add_row(f"[bold]{prog} {name}[/]", summary)
        console.print(table)
        return None
    name, rest = args[0], args[1:]
    if name not in commands:
        raise RetrofitError(f"unknown command {name!r}: choose one of {', '.join(commands)} (`{prog} --help`).")
    return commands[name][1](rest, f"{prog} {name}")


COMMANDS: dict[str, tuple[str, Runner]] = {
    "fit": ("Retrofit registers into a model by self-distillation (LightningCLI; --config recipes/NAME.yaml).",
            fit),
    "diagnose": (_doc_summary(diagnose_command), partial(_run_function, diagnose_command)),
    "eval": ("Downstream evaluation of dense features: eval lost | eval probe.", partial(_dispatch, EVAL_COMMANDS)),
    "export": (_doc_summary(export_command), partial(_run_function, export_command)),
    "demo": (_doc_summary(demo_command), partial(_run_function, demo_command)),
    "recipes": (_doc_summary(recipes_command), partial(_run_function, recipes_command)),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors print as one line (no traceback) and exit with status 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        print(f"retrofit {__version__}")
        return 0
    try:
        _dispatch(COMMANDS, args, "retrofit")
    except RetrofitError as e:
        print(f"retrofit: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)  # 128 + signal for a run stopped by SIGTERM / Ctrl-C
    except KeyboardInterrupt:
        print("retrofit: error: interrupted by Ctrl-C.", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help and --print_config exit through argparse
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
