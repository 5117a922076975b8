"""README.md says what the code does: its `retrofit fit` commands parse, its counts are the computed ones."""

import re
import shlex
from pathlib import Path

from retrofit.fit_cli import fit_config
from retrofit.recipes import trainable_parameters

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def fit_commands() -> list[list[str]]:
    """The arguments of every `retrofit fit` line in the README's bash blocks (continuations joined)."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S)).replace("\\\n", " ")
    return [shlex.split(line, comments=True)[2:] for line in text.splitlines() if line.startswith("retrofit fit ")]


def test_every_fit_command_parses_and_the_offline_dry_run_is_there(tmp_path: Path) -> None:
    configs = [fit_config([a for a in args if a != "--print_config"]) for args in fit_commands()]
    assert len(configs) >= 3
    dry = [c for c in configs if c.model.model_kwargs and c.model.model_kwargs.get("pretrained") is False]
    assert [c.model.model_kwargs for c in dry] == [{"img_size": 224, "pretrained": False}]  # no weights, no network
    assert dry[0].data.img_size == 224


def test_the_trainable_count_is_the_computed_one(tmp_path: Path) -> None:
    quoted = re.search(r"e\.g\. (\S+ of \S+) for DINOv2 ViT-B \+ 4 registers", README)[1]
    trainable, total = trainable_parameters(fit_config(["--config", "dinov2_vitb14_reg4", "--data.source", "."]).model)
    assert quoted == f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M" == "7.09M of 86.6M"  # as `retrofit recipes` says


def test_timings_name_their_machine_and_layers_show_their_form() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| wall time of the whole demo"))
    assert re.search(r"AMD EPYC|Intel|Apple", row) and "other jobs" in row, row
    assert "--layers 4 11" in README
