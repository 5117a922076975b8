"""``retrofit fit``: a LightningCLI front end to the pipeline (:mod:`retrofit.pipeline`).

It parses recipe names or config files, dotted overrides and ``--print_config`` over
:class:`RetrofitModule`, :class:`RetrofitDataModule` and the pipeline's :func:`~retrofit.pipeline.trainer`
(so its defaults are the Python API's), saves the resolved config beside the run, and trains and exports
with :func:`~retrofit.pipeline.train`. It lives apart from :mod:`retrofit.cli` so that the other commands,
and ``retrofit --help``, never import Lightning.
"""

from __future__ import annotations

import importlib.util
import logging
import shlex
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from . import __version__
from .callbacks import RegisterExport
from .cli import Strict
from .commands import console
from .data import RetrofitDataModule
from .faults import check_resume
from .hub import check_repo
from .module import RetrofitModule
from .pipeline import train, trainer
from .recipes import resolve_config

SEED_LOG = "lightning.fabric.utilities.seed"


class FitParser(Strict, LightningArgumentParser):
    pass


class RecipeOrFile(ActionConfigFile):
    """``--config`` takes a YAML/JSON file or the name of a shipped recipe (``retrofit recipes``)."""

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: str, option_string: str | None = None):
        super().__call__(parser, cfg, resolve_config(values), option_string)


class RetrofitCLI(LightningCLI):
    """``retrofit fit``: LightningCLI with the retrofit classes and the pipeline's Trainer, a default logger,
    metrics.csv and a final export (optionally pushed to the Hub).

    With ``instantiate=False`` it only parses and validates (recipes are checked this way, no model built).
    """

    def __init__(self, args: Sequence[str], instantiate: bool = True) -> None:
        self._instantiate = instantiate
        # Field docstrings (TargetSettings) reach --help; a backbone is a name or a path, never an nn.Module class.
        set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_disabled=[nn.Module])
        super().__init__(
            RetrofitModule,
            RetrofitDataModule,
            trainer_class=trainer,  # the pipeline's defaults: retrofit() builds its Trainer with the same function
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "retrofit fit",
                "usage": "retrofit fit [--config RECIPE|FILE] [--data.source DIR] [--print_config]\n"
                f"{' ' * 20}[--model.KEY VALUE] [--data.KEY VALUE] [--trainer.KEY VALUE]\n"
                f"{' ' * 20}[--ckpt_path CKPT] [--export_dir DIR] [--push_to_hub REPO]",
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

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """As LightningCLI's, with retrofit's own settings (model, data) before the Trainer's in --help."""
        parser.add_lightning_class_args(RetrofitModule, "model")
        parser.add_lightning_class_args(RetrofitDataModule, "data")
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume training from this Lightning checkpoint (written by an earlier fit).")
        parser.add_argument("--export_dir", type=str | None, default=None,
                            help="Where the timm-native model is written at the end (default: <log_dir>/model).")
        parser.add_argument("--push_to_hub", type=str | None, default=None,
                            help="Also upload the final model to this Hugging Face Hub repo (USER/NAME).")

    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        self.config = parser.parse_args(args)  # `args` is the command line here: no "both given" warning

    def instantiate_classes(self) -> None:
        if self._instantiate:
            if self.config.push_to_hub is not None:
                check_repo(self.config.push_to_hub)  # a bad repo id or no token: before any model is built
            check_resume(self.config.ckpt_path)
            super().instantiate_classes()
            add_metrics_csv(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Unless a logger is configured: TensorBoard when it is installed, else CSV (no warning either way).

        The data source is opened first: a missing folder or dataset is one line before the Trainer reports
        its devices.
        """
        self.datamodule.setup("fit")
        settings = self.config_init.get("trainer") or {}  # run=False: the config has no subcommand level
        if settings.get("logger") in (None, True):
            root = settings.get("default_root_dir") or Path.cwd()
            kwargs["logger"] = TensorBoardLogger(root) if _tensorboard_available() else CSVLogger(root)
        return super().instantiate_trainer(**kwargs)


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def add_metrics_csv(run: L.Trainer) -> None:
    """Log to ``metrics.csv`` in the run folder as well, whatever other logger the run has (none: nothing)."""
    loggers = run.loggers
    if loggers and not any(isinstance(logger, CSVLogger) for logger in loggers):
        first = loggers[0]
        run.loggers = [*loggers, CSVLogger(first.save_dir, name=first.name, version=first.version)]
        # It shares the first logger's version folder on purpose, so its "folder is not empty" warning says nothing.
        warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger ``name`` says nothing inside the block."""
    log = logging.getLogger(name)
    log.disabled, disabled = True, log.disabled
    try:
        yield
    finally:
        log.disabled = disabled


def fit_config(args: Sequence[str]) -> Namespace:
    """The resolved ``retrofit fit`` configuration for ``args``, validated without building anything."""
    with _quiet(SEED_LOG):
        return RetrofitCLI(args, instantiate=False).config


def _resume_command(run: L.Trainer) -> str:
    """How a stopped ``retrofit fit`` resumes: the run's own resolved config, and the checkpoint."""
    config = Path(run.log_dir or run.default_root_dir) / "config.yaml"
    return f"retrofit fit --config {shlex.quote(str(config))} --ckpt_path {{ckpt}}"


def fit(args: Sequence[str]) -> Path:
    """Train as configured, then export; returns the export directory (also printed)."""
    with _quiet(SEED_LOG):  # "Seed set to 0": config.yaml keeps the seed, and the line came before any error
        cli = RetrofitCLI(args)
    export = RegisterExport(cli.config.export_dir, push_to_hub=cli.config.push_to_hub)
    train(cli.trainer, cli.model, cli.datamodule, ckpt_path=cli.config.ckpt_path, export=export,
          resume=_resume_command)
    console.print(f"retrofitted model: [bold]{export.out_dir}[/] (config and checkpoints in {cli.trainer.log_dir})",
                  soft_wrap=True)
    if export.pushed_url:
        console.print(f"pushed: {export.pushed_url}", soft_wrap=True)
    return export.out_dir
