"""`retrofit` console script: fit, diagnose, eval, export, demo and recipes over the library's own functions.

``fit`` is a LightningCLI over :class:`RetrofitModule` and :class:`RetrofitDataModule` (config files or
recipe names, dotted overrides, ``--print_config``, the resolved config saved beside the run). Every other
command is a plain function (here and in :mod:`retrofit.commands`) that jsonargparse's ``auto_cli`` turns
into a subcommand from its typed signature and docstring, from the nested dict ``COMMANDS``, as litgpt
does. All parsers refuse abbreviated options and report a bad configuration as one line naming the field
(with the nearest option for a typo), before any model is built.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
import shlex
import sys
import typing
import warnings
from argparse import Action
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
    auto_cli,
    set_parsing_settings,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.logging import RichHandler
from torch import nn

from . import __version__, commands
from .callbacks import RegisterExport, StepProgressBar
from .commands import console
from .data import RetrofitDataModule
from .errors import RetrofitError
from .faults import check_resume, continue_run, explain_stops, fault_callbacks
from .hub import check_repo
from .module import RetrofitModule
from .recipes import (
    markdown_table,
    recipe_path,
    recipe_paths,
    recipe_summary,
    recipes_dir,
    resolve_config,
    summary_table,
)
from .steps import ignore_epoch_warnings, log_interval

SEED_LOG = "lightning.fabric.utilities.seed"

# ---- parsing ------------------------------------------------------------------------------------------


SPHINX = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``")  # :func:`name`, ``code``


def plain_text(text: str) -> str:
    """Docstring text as --help shows it: the names in Sphinx roles and double backticks without the markup."""
    return SPHINX.sub(lambda m: m[1] or m[2], text)


class PlainHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help (types and defaults) in plain text: the docstrings it quotes are written for Sphinx."""

    def _get_help_string(self, action: Action) -> str:
        return plain_text(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


class Strict:
    """Parser mixin: options are never abbreviated, help is plain text, and every error is one RetrofitError line
    naming the field (an unknown option gets the nearest real one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, "formatter_class": PlainHelpFormatter, **kwargs})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        text = _plain_union_error(" ".join(message.split()))
        words = text.split()
        if text.startswith("unrecognized arguments:") and len(words) > 2:
            close = difflib.get_close_matches(words[2].split("=")[0], parser._option_string_actions, n=1)
            text += f"; did you mean {close[0]}?" if close else ""
        prog = parser.prog.replace(" [options]", "")
        raise RetrofitError(f"invalid configuration: {text} (`{prog} --help` lists the options).")


UNION_ERROR = re.compile(r'Parser key "(?P<key>[^"]+)": Does not validate against any of the Union subtypes '
                         r"Subtypes: \[(?P<types>.*?)\] Errors: .* Given value: (?P<value>.*)")


def _plain_union_error(text: str) -> str:
    """jsonargparse's account of a value that fits none of an option's types, as one short sentence."""
    if (match := UNION_ERROR.fullmatch(text)) is None:
        return text
    types = match["types"].replace("<class 'NoneType'>", "null").replace("typing.", "").replace(", ", " or ")
    return f"--{match['key']} does not take {match['value']!r}: it takes {types}"


class CommandParser(Strict, ArgumentParser):
    def add_subcommands(self, *args: Any, **kwargs: Any) -> Any:
        """A parser that only dispatches to subcommands has no settings of its own: no --config / --print_config
        (auto_cli gives every parser those; the subcommands keep theirs)."""
        for action in [a for a in self._actions if a.dest in ("config", "print_config")]:
            for option in action.option_strings:
                del self._option_string_actions[option]
            action.container._remove_action(action)
        return super().add_subcommands(*args, **kwargs)


class FitParser(Strict, LightningArgumentParser):
    pass


class RecipeOrFile(ActionConfigFile):
    """``--config`` takes a YAML/JSON file or the name of a shipped recipe (``retrofit recipes``)."""

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: str, option_string: str | None = None):
        super().__call__(parser, cfg, resolve_config(values), option_string)


# ---- fit ----------------------------------------------------------------------------------------------


class RetrofitCLI(LightningCLI):
    """``retrofit fit``: LightningCLI with the retrofit classes, step progress, a default logger, metrics.csv and a
    final export (optionally pushed to the Hub).

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
        """Unless a logger is configured: TensorBoard when it is installed, else CSV (no warning either way); unless
        an interval is, logs often enough for the run's length (:func:`retrofit.steps.log_interval`).

        The data source is opened first: a missing folder or dataset is one line before the Trainer reports
        its devices.
        """
        self.datamodule.setup("fit")
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") in (None, True):
            root = trainer.get("default_root_dir") or Path.cwd()
            kwargs["logger"] = TensorBoardLogger(root) if _tensorboard_available() else CSVLogger(root)
        if trainer.get("log_every_n_steps") is None:
            kwargs["log_every_n_steps"] = log_interval(trainer.get("max_steps", -1))
        ignore_epoch_warnings()
        return super().instantiate_trainer(**kwargs)


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def add_metrics_csv(trainer: L.Trainer) -> None:
    """Log to ``metrics.csv`` in the run folder as well, whatever other logger the run has (none: nothing)."""
    loggers = trainer.loggers
    if loggers and not any(isinstance(logger, CSVLogger) for logger in loggers):
        first = loggers[0]
        trainer.loggers = [*loggers, CSVLogger(first.save_dir, name=first.name, version=first.version)]
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


def fit(args: Sequence[str]) -> Path:
    """Retrofit registers into a model by self-distillation (LightningCLI: --config NAME, dotted overrides).

    Trains as configured, then exports; returns the export directory (also printed).
    """
    with _quiet(SEED_LOG):  # "Seed set to 0": config.yaml keeps the seed, and the line came before any error
        cli = RetrofitCLI(args)
    trainer = cli.trainer
    continue_run(trainer, cli.config.ckpt_path)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    out = Path(cli.config.export_dir or log_dir / "model")
    export = RegisterExport(out, push_to_hub=cli.config.push_to_hub)
    resume = f"retrofit fit --config {shlex.quote(str(log_dir / 'config.yaml'))} --ckpt_path {{ckpt}}"
    trainer.callbacks = [*fault_callbacks(resume), *trainer.callbacks, export]
    with explain_stops(trainer):
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    console.print(f"retrofitted model: [bold]{out}[/] (config and checkpoints in {trainer.log_dir})", soft_wrap=True)
    if export.pushed_url:
        console.print(f"pushed: {export.pushed_url}", soft_wrap=True)
    return out


# ---- recipes ------------------------------------------------------------------------------------------


def _summary(path: Path) -> dict[str, str]:
    return recipe_summary(path, fit_config(["--config", str(path), "--data.source", "."]))  # validated by fit's parser


def recipes_command(markdown: bool = False) -> list[dict[str, str]]:
    """List the shipped training recipes: backbone, settings and trainable parameters of each.

    Args:
        markdown: print a Markdown table instead (the one in recipes/README.md).
    """
    rows = [_summary(p) for p in recipe_paths()]
    if markdown:
        print(markdown_table(rows))
        return rows
    console.print(f"{len(rows)} recipes in {recipes_dir()}", soft_wrap=True)
    console.print("Train with one: retrofit fit --config NAME --data.source DIR\n"
                  "Show one:       retrofit recipe NAME\n")
    console.print(summary_table(rows))
    return rows


def recipe_command(name: str) -> dict[str, str]:
    """Show one training recipe: its YAML (every key commented) and what it trains.

    Args:
        name: the recipe's name, as `retrofit recipes` lists it.
    """
    path = recipe_path(name)
    row = _summary(path)
    console.print(f"# {path}", style="dim", soft_wrap=True)
    console.print(path.read_text(), markup=False, highlight=False, soft_wrap=True, end="")  # as written: 80 columns
    console.print(summary_table([row]))
    return row


COMMANDS: dict[str, Any] = {
    "fit": fit,  # listed in `retrofit --help`; main() hands fit's arguments to RetrofitCLI
    "diagnose": commands.diagnose_command,
    "neurons": commands.neurons_command,
    "eval": {"_help": "Downstream evaluation of dense features: eval lost | eval probe.",
             "lost": commands.eval_lost_command, "probe": commands.eval_probe_command},
    "export": commands.export_command,
    "demo": commands.demo_command,
    "recipes": recipes_command,
    "recipe": recipe_command,
}


NUMBERS = re.compile(r"-?\d+(\.\d*)?(,-?\d+(\.\d*)?)*")  # "4", "-1", "4,11"


def _number_lists(commands: dict[str, Any]) -> set[str]:
    """The options of ``commands`` (nested) whose values are lists of numbers, such as diagnose's ``--layers``."""
    options = set()
    for command in commands.values():
        if isinstance(command, dict):
            options |= _number_lists(command)
        elif callable(command):
            for name, hint in typing.get_type_hints(command).items():
                lists = [t for t in (hint, *typing.get_args(hint)) if typing.get_origin(t) is list]
                if lists and set(typing.get_args(lists[0])) <= {int, float}:
                    options.add(f"--{name}")
    return options


def join_number_lists(args: Sequence[str], options: set[str]) -> list[str]:
    """``--layers 11``, ``--layers 4 11`` and ``--layers 4,11`` as jsonargparse reads a list: ``--layers=[4,11]``
    (which, like ``--layers '[4, 11]'``, it also takes as it is)."""
    out, i = [], 0
    while i < len(args):
        option, _, value = args[i].partition("=")
        end = i + 1
        while option in options and not value and end < len(args) and NUMBERS.fullmatch(args[end]):
            end += 1
        values = [value] if option in options and NUMBERS.fullmatch(value) else args[i + 1:end]
        out.append(f"{option}=[{','.join(values)}]" if values else args[i])
        i = end
    return out


TIMM_MESSAGES = ("Loading pretrained weights from Hugging Face hub", "Loading pretrained weights from url",
                 "Downloading", "Resized position embedding")


def _show_timm_messages() -> None:
    """timm's INFO lines a person waiting wants: which weights download from where, a resized position embedding."""
    timm_log = logging.getLogger("timm")
    if not any(isinstance(h, RichHandler) for h in timm_log.handlers):
        handler = RichHandler(console=console, show_time=False, show_level=False, show_path=False)
        handler.setFormatter(logging.Formatter("timm: %(message)s"))
        handler.addFilter(lambda record: record.getMessage().startswith(TIMM_MESSAGES))
        timm_log.addHandler(handler)
    timm_log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: errors print as one line (no traceback) and exit with status 1 (128 + the signal's number for
    a run stopped by SIGTERM or Ctrl-C)."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    _show_timm_messages()
    # Field docstrings (TargetSettings) reach --help; a backbone is a name or a path, never an nn.Module class path.
    set_parsing_settings(docstring_parse_attribute_docstrings=True, subclasses_disabled=[nn.Module])
    try:
        if args[0] == "fit":
            fit(args[1:])
        else:
            auto_cli(COMMANDS, args=join_number_lists(args, _number_lists(COMMANDS)), parser_class=CommandParser,
                     prog="retrofit", version=__version__,
                     description="Give a pretrained timm ViT register tokens after the fact.")
    except RetrofitError as e:
        print(f"retrofit: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)  # 128 + signal for a run stopped by SIGTERM / Ctrl-C
    except KeyboardInterrupt:
        print("retrofit: error: interrupted by Ctrl-C.", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help, --version and --print_config exit through argparse
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
