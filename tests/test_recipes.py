"""Recipes: every YAML validates against `retrofit fit`'s parser, and the README's parameter counts are computed."""

import re
from pathlib import Path

import pytest
import timm

from retrofit.cli import console, main, recipes_command
from retrofit.fit_cli import fit_config
from retrofit.recipes import recipe_paths, recipes_dir, trainable_parameters

RECIPES = recipe_paths()
LEAF_KEY = re.compile(r"^\s*(- )?[\w_]+: \S")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_with_phreg_schedule_and_repairing_defaults(path: Path, tmp_path: Path) -> None:
    config = fit_config(["--config", str(path), "--data.source", str(tmp_path)])
    assert config.trainer.precision == "auto" and config.model.freeze == "auto"  # bf16-mixed on native-bf16 GPUs
    assert config.trainer.log_every_n_steps is None  # the run's length sets it: --trainer.max_steps 40 logs too
    assert config.model.loss_layers == "auto" and config.model.register_neurons == "auto"
    assert config.data.img_size == config.model.model_kwargs["img_size"]
    assert timm.is_model(config.model.backbone)
    family = "clip" if "clip" in path.stem else "dinov2" if "dinov2" in path.stem else "other"
    expected = {"clip": (3e-4, 1e-5, 448), "dinov2": (1e-4, 5e-6, 518)}.get(family)
    if expected:
        assert (config.model.lr, config.model.min_lr, config.data.img_size) == expected
    if family == "dinov2":
        assert config.model.num_registers == int(path.stem.rsplit("reg", 1)[1])
    lines = path.read_text().splitlines()
    uncommented = [line for above, line in zip(["", *lines[:-1]], lines, strict=True)
                   if LEAF_KEY.match(line) and " # " not in line and not above.lstrip().startswith("# ")]
    assert not uncommented, uncommented  # every key: a comment after it, or on the line above


def test_all_required_models_have_recipes() -> None:
    stems = {p.stem for p in RECIPES}
    for size in "sblg":
        assert {f"dinov2_vit{size}14_reg4", f"dinov2_vit{size}14_reg16"} <= stems
    assert {"clip_vitb16_openai", "clip_vitl14_openai", "openclip_vitb16_laion2b"} <= stems
    assert any(s.startswith("deit3_base") for s in stems) and any(s.startswith("eva02") for s in stems)


def test_trainable_parameters_match_a_hand_count(tmp_path: Path) -> None:
    config = fit_config(["--model.backbone", "test_vit", "--model.num_registers", "4", "--data.source", str(tmp_path)])
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0)
    dim, grid = vit.embed_dim, vit.patch_embed.num_patches
    hand = 4 * dim + sum(p.numel() for p in vit.blocks[2].parameters())  # the new registers + one block (auto)
    trainable, total = trainable_parameters(config.model)
    assert trainable == hand
    phreg = fit_config(["--model.backbone", "test_vit", "--model.num_registers", "4", "--model.freeze", "phreg",
                        "--data.source", str(tmp_path)])
    hand = (
        4 * dim  # the new registers
        + grid * dim  # the patch part of the position embedding (the class part is folded into cls_token)
        + sum(p.numel() for p in vit.patch_embed.parameters())
        + sum(p.numel() for p in vit.blocks[-1].parameters())
    )
    assert trainable_parameters(phreg.model)[0] == hand
    assert total == sum(p.numel() for p in vit.parameters()) - dim + 4 * dim  # pos_embed lost its class row


def test_readme_table_holds_the_computed_counts(tmp_path: Path) -> None:
    readme = (recipes_dir() / "README.md").read_text()
    for stem in ("dinov2_vits14_reg4", "dinov2_vits14_reg16", "deit3_base_p16_384"):
        config = fit_config(["--config", stem, "--data.source", str(tmp_path)])
        trainable, total = trainable_parameters(config.model)
        row = next(line for line in readme.splitlines() if f"`{stem}`" in line)
        assert f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M" in row, row


def test_recipes_read_well_at_80_columns(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 80)
    rows = recipes_command()
    listed = capsys.readouterr().out
    assert max(len(line) for line in listed.splitlines()) <= 80 and len(rows) == len(RECIPES)
    for row in rows:  # names whole, never broken inside a word; the trainable count shown for each
        assert re.search(rf"^{row['recipe']} +{re.escape(row['backbone'])} *$", listed, re.MULTILINE), row
    assert listed.count("trains ") == len(RECIPES) and listed.count(" parameters") == len(RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fits_80_columns_with_each_command_on_one_line(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert f"#   retrofit fit --config {path.stem} --data.source DIR_OF_IMAGES" in lines  # whole, copyable
    assert "#   --trainer.max_steps 500 --model.num_registers 8" in lines


def test_recipe_shows_the_whole_yaml_and_its_parameter_count(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "width", 80)
    assert main(["recipe", "dinov2_vitb14_reg4"]) == 0
    shown = capsys.readouterr().out
    path = recipes_dir() / "dinov2_vitb14_reg4.yaml"
    assert path.read_text() in shown  # as written, never re-wrapped (which broke the commands in its comments)
    assert max(len(line) for line in shown.splitlines()[1:]) <= 80  # the first line names the file's path
    assert "trains 7.09M of 86.6M parameters" in shown
    assert main(["recipe", "dinov2_vitb14_reg5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no recipe or config file 'dinov2_vitb14_reg5'" in err
