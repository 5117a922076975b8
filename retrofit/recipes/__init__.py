"""Training recipes: the commented YAML files of the repository's top-level ``recipes/`` folder.

The wheel ships those files inside this package (hatchling ``force-include``), so ``retrofit fit
--config NAME`` finds a recipe by name from any directory; a source checkout reads the folder itself.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from jsonargparse import Namespace
from rich.table import Table

from ..backbones import load_backbone
from ..errors import RetrofitError
from ..module import RetrofitModule

SUFFIX = ".yaml"


def recipes_dir() -> Path:
    """This package's own folder when the recipes ship in it (a wheel), else the checkout's ``recipes/``."""
    packaged = Path(str(files(__name__)))
    return packaged if any(packaged.glob(f"*{SUFFIX}")) else packaged.parent.parent / "recipes"


def recipe_paths() -> list[Path]:
    """Every recipe, sorted by name."""
    paths = sorted(recipes_dir().glob(f"*{SUFFIX}"))
    if not paths:
        raise RetrofitError(f"no recipes in {recipes_dir()}: reinstall retrofit (the wheel ships them).")
    return paths


def recipe_path(name: str) -> Path:
    """The recipe called ``name`` (with or without ``.yaml``), or a one-line error listing the recipes."""
    paths = {p.stem: p for p in recipe_paths()}
    stem = name.removesuffix(SUFFIX)
    if stem not in paths:
        raise RetrofitError(f"no recipe or config file {name!r}: pass a YAML path or one of {', '.join(paths)}.")
    return paths[stem]


def resolve_config(value: str) -> str:
    """A ``--config`` value: an existing file stays as it is, a recipe name becomes the recipe's path."""
    return value if Path(value).is_file() else str(recipe_path(value))


def trainable_parameters(model: Namespace) -> tuple[int, int]:
    """(trainable, total) student parameters of fit's ``model`` settings, built on the meta device.

    The student is built by RetrofitModule itself, so the count is what the freeze preset really trains.
    ``auto`` trains the blocks where the artifacts build, which only the data tells; every block of a ViT has
    the same size, so it is counted with one block (at a third of the depth): the least it trains. The classifier
    head is left out of the total: it never reaches the patch features.
    """
    settings = {k: v for k, v in model.as_dict().items() if k not in ("backbone", "checkpoint", "model_kwargs")}
    with torch.device("meta"):
        arch = load_backbone(model.backbone, pretrained=False, **{"num_classes": 0, **(model.model_kwargs or {})})
        if settings.get("artifact_blocks") is None:
            settings["artifact_blocks"] = [len(arch.blocks) // 3]
        student = RetrofitModule(arch, **settings).student
    params = list(student.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def recipe_summary(path: Path, config: Namespace) -> dict[str, str]:
    """What a recipe trains, from its resolved fit ``config``, with the student counted on the meta device."""
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


def summary_table(rows: list[dict[str, str]]) -> Table:
    """Two columns, so a narrow terminal wraps a recipe's settings between words, never inside a name."""
    table = Table.grid(padding=(0, 2, 1, 0))
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for row in rows:
        table.add_row(row["recipe"], f"{row['backbone']}\n{row['registers']} registers, {row['px']} px, "
                      f"lr {row['lr']}, batch {row['batch']}, {row['steps']} steps; "
                      f"trains {row['trainable params']} parameters")
    return table


def markdown_table(rows: list[dict[str, str]]) -> str:
    """The summaries as the Markdown table of recipes/README.md."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(f"`{v}`" if k in ("recipe", "backbone") else v for k, v in row.items()) + " |"
              for row in rows]
    return "\n".join(lines)
