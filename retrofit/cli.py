"""`retrofit` console script: fit, diagnose, eval, export, demo and recipes over the library's own functions.

Every command is a plain function (here and in :mod:`retrofit.commands`) that jsonargparse's ``auto_cli``
turns into a subcommand from its typed signature and docstring, from the nested dict ``COMMANDS``, as litgpt
does; ``fit`` hands its arguments to a LightningCLI (:mod:`retrofit.fit_cli`). The commands import what they
use when they run, so ``retrofit --help`` lists them without loading Lightning, timm or torch. All parsers
refuse abbreviated options and report a bad configuration as one line naming the field (with the nearest
option for a typo), before any model is built.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import sys
from argparse import Action
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser, DefaultHelpFormatter, auto_cli
from rich.logging import RichHandler

from . import __version__, commands
from .commands import console
from .errors import RetrofitError

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

    def _format_action_invocation(self, action: Action) -> str:
        """A list option without its ``--name+ VALUE`` (append) twin, so the line fits 80 columns."""
        strings = [s for s in action.option_strings if not s.endswith("+")]
        if len(strings) == len(action.option_strings) or not strings:
            return super()._format_action_invocation(action)
        return f"{', '.join(strings)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


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


# ---- fit ----------------------------------------------------------------------------------------------


def fit(args: Sequence[str]) -> Path:
    """Retrofit registers into a model by self-distillation (LightningCLI: --config NAME, dotted overrides).

    Trains as configured, then exports; returns the export directory (also printed).
    """
    from .fit_cli import fit as run_fit

    return run_fit(args)


# ---- recipes ------------------------------------------------------------------------------------------


def _summary(path: Path) -> dict[str, str]:
    from .fit_cli import fit_config
    from .recipes import recipe_summary

    return recipe_summary(path, fit_config(["--config", str(path), "--data.source", "."]))  # validated by fit's parser


def recipes_command(markdown: bool = False) -> list[dict[str, str]]:
    """List the shipped training recipes: backbone, settings and trainable parameters of each.

    Args:
        markdown: print a Markdown table instead (the one in recipes/README.md).
    """
    from .recipes import markdown_table, recipe_paths, recipes_dir, summary_table

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
    from .recipes import recipe_path, summary_table

    path = recipe_path(name)
    row = _summary(path)
    console.print(f"# {path}", style="dim", soft_wrap=True)
    console.print(path.read_text(), markup=False, highlight=False, soft_wrap=True, end="")  # as written: 80 columns
    console.print(summary_table([row]))
    return row


COMMANDS: dict[str, Any] = {
    "fit": fit,  # listed in `retrofit --help`; main() hands fit's arguments to the LightningCLI
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
NUMBER_LIST = re.compile(r"list\[(int|float)\]( \| None)?")  # an annotation, as text (postponed evaluation)


def _number_lists(commands: dict[str, Any]) -> set[str]:
    """The options of ``commands`` (nested) whose values are lists of numbers, such as diagnose's ``--layers``."""
    options = set()
    for command in commands.values():
        if isinstance(command, dict):
            options |= _number_lists(command)
        elif callable(command):
            options |= {f"--{name}" for name, parameter in inspect.signature(command).parameters.items()
                        if NUMBER_LIST.fullmatch(str(parameter.annotation))}
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
