"""The `retrofit` CLI end to end, in process, on a tiny test_vit and made-up images (no downloads)."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from retrofit import export, load, patch_features
from retrofit.cli import config_error, fit_config, main
from retrofit.surgery import count_registers

from .conftest import perturb_

SIZE = 64  # test_vit has 16 px patches: a 4 x 4 grid


def write_images(folder: Path, n: int, size: int = SIZE, seed: int = 0) -> Path:
    """``n`` PNGs of flat backgrounds with a textured square (where artifacts would and would not form)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        img[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, (size // 3, size // 3, 3))
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return folder


def tiny_model_dir(folder: Path) -> Path:
    """A test_vit with non-trivial weights, exported: a model spec that load_backbone reads offline."""
    return export(perturb_(timm.create_model("test_vit", pretrained=False, img_size=SIZE)), folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    return {"root": root, "model": tiny_model_dir(root / "original"), "images": write_images(root / "images", 8)}


def fit_args(ws: dict[str, Path], run: str, *extra: str) -> list[str]:
    return [
        "fit", "--model.backbone", str(ws["model"]), "--data.source", str(ws["images"]),
        "--data.img_size", str(SIZE), "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(ws["root"] / run), *extra,
    ]


@pytest.fixture(scope="module")
def fitted(workspace: dict[str, Path]) -> Path:
    """One short fit with command-line overrides; returns its log dir."""
    assert main(fit_args(workspace, "run", "--model.num_registers", "2", "--model.lr", "3e-4")) == 0
    return workspace["root"] / "run" / "lightning_logs" / "version_0"


def test_fit_saves_resolved_config_checkpoint_and_timm_export(fitted: Path) -> None:
    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["model"]["num_registers"] == 2 and config["model"]["lr"] == 3e-4  # overrides resolved
    assert config["trainer"]["max_steps"] == 2
    model = load(fitted / "model")
    assert count_registers(model) == 2
    assert json.loads((fitted / "model" / "config.json").read_text())["retrofit"]["step"] == 2
    assert list((fitted / "checkpoints").glob("*.ckpt"))


def test_export_of_checkpoint_equals_fit_export(fitted: Path, workspace: dict[str, Path]) -> None:
    ckpt = next((fitted / "checkpoints").glob("*.ckpt"))
    out = workspace["root"] / "exported"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    info = json.loads((out / "config.json").read_text())["retrofit"]
    assert info["step"] == 2 and info["num_registers"] == 2 and info["backbone"] == str(workspace["model"])
    images = torch.randn(2, 3, SIZE, SIZE)
    ours, fits = load(out), load(fitted / "model")
    torch.testing.assert_close(patch_features(ours, images), patch_features(fits, images), rtol=0, atol=0)
    original = load(workspace["model"])
    assert not torch.equal(patch_features(ours, images), patch_features(original, images))  # it did train
    assert main(["export", str(ckpt), "--out", str(out)]) == 1  # existing output kept without --overwrite


def test_export_with_the_wrong_backbone_is_one_line(fitted: Path, workspace: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = next((fitted / "checkpoints").glob("*.ckpt"))
    out = workspace["root"] / "wrong"
    assert main(["export", str(ckpt), "--out", str(out), "--backbone", "deit3_small_patch16_224"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit a deit3_small_patch16_224 student" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--model.bogus", "1"], "--model.bogus: unknown option"),
        (["--model.num_registers", "four"], "model.num_registers: expected int"),
        (["--model.freeze", "bogus"], "model.freeze: expected one of 'phreg'"),
        (["--trainer.max_steps", "1.5"], "trainer.max_steps: expected int"),
    ],
)
def test_bad_fit_config_is_one_line_before_any_model_is_built(
    extra: list[str], field: str, workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", no_model)
    assert main(fit_args(workspace, "bad", *extra)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err, err
    assert "Traceback" not in err


def test_bad_key_in_config_file_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backbone: test_vit\n  num_registrs: 4\n")
    assert main(["fit", "--config", str(config), "--data.source", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.num_registrs: unknown key" in err, err


def test_config_error_message_is_one_line() -> None:
    message = 'Parser key "model.freeze":\n  Expected a typing.Literal[\'phreg\', \'full\']. Got value: x'
    text = str(config_error(message, "retrofit fit"))
    assert "\n" not in text and text.startswith("invalid configuration: model.freeze: expected one of")


def test_print_config_resolves_overrides(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(fit_args(workspace, "print", "--model.num_registers", "16", "--print_config")) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["num_registers"] == 16 and config["data"]["img_size"] == SIZE


def test_fit_config_validates_without_building(workspace: dict[str, Path]) -> None:
    config = fit_config(fit_args(workspace, "x")[1:] + ["--model.targets.num_views", "3"])
    assert config.model.targets.num_views == 3 and config.model.freeze == "phreg"


def test_help_documents_options(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["fit"], ["diagnose"], ["eval", "lost"], ["eval", "probe"], ["export"], ["demo"], ["recipes"]):
        assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model.num_registers", "--trainer.max_steps", "--compare", "--num_classes", "--overwrite",
                   "--steps", "--params"):
        assert option in out
    assert main([]) == 0 and "retrofit diagnose" in capsys.readouterr().out


def test_unknown_command_and_missing_model_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 1
    assert main(["diagnose", str(tmp_path / "nope.safetensors"), "--images", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "unknown command 'trian'" in lines[0] and "--checkpoint" in lines[1]


def test_diagnose_compare_writes_json_and_pngs(fitted: Path, workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "diagnose"
    args = ["diagnose", str(fitted / "model"), "--images", str(workspace["images"]),
            "--compare", str(workspace["model"]), "--out", str(out), "--max_images", "3"]
    assert main(args) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert [m["num_registers"] for m in report["models"]] == [2, 0]
    assert [m["label"] for m in report["models"]] == ["model", "original"]
    assert len(list(out.glob("0*_img*.png"))) >= 3 and len(report["images"]) == 3


def test_eval_lost_and_probe(workspace: dict[str, Path]) -> None:
    root, images = workspace["root"], workspace["images"]
    boxes = {p.name: [[8, 8, 40, 40]] for p in images.glob("*.png")}
    (root / "boxes.json").write_text(json.dumps(boxes))
    lost_out = root / "lost.json"
    args = ["eval", "lost", str(workspace["model"]), "--dataset", str(images), "--boxes", str(root / "boxes.json"),
            "--k", "3", "--out", str(lost_out)]
    assert main(args) == 0
    lost = json.loads(lost_out.read_text())
    assert lost["n"] == 8 and 0 <= lost["corloc"] <= 1 and len(lost["per_image"]) == 8

    seg = root / "seg"
    write_images(seg / "images", 6)
    (seg / "masks").mkdir()
    for i in range(6):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[SIZE // 2:] = 1
        Image.fromarray(mask).save(seg / "masks" / f"img{i:02d}.png")
    probe_out = root / "probe.json"
    args = ["eval", "probe", str(workspace["model"]), "--train", str(seg), "--val", str(seg), "--num_classes", "2",
            "--epochs", "2",
            "--out", str(probe_out)]
    assert main(args) == 0
    probe = json.loads(probe_out.read_text())
    assert probe["n_train"] == 6 and 0 <= probe["miou"] <= 1


def test_diagnose_and_eval_skip_and_count_unreadable_images(workspace: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = write_images(workspace["root"] / "mixed", 3)
    (root / "broken.png").write_bytes(b"\x89PNG but not an image")
    (root / "empty.jpg").write_bytes(b"")
    out, model = workspace["root"] / "diagnose-mixed", str(workspace["model"])
    assert main(["diagnose", model, "--images", str(root), "--out", str(out), "--max_images", "8"]) == 0
    assert len(json.loads((out / "diagnose.json").read_text())["images"]) == 3
    skipped = "skipped 2 unusable image(s): 1 empty file, 1 not an image (broken.png, empty.jpg)."
    assert skipped in capsys.readouterr().out
    boxes = workspace["root"] / "mixed-boxes.json"
    boxes.write_text(json.dumps({p.name: [[8, 8, 40, 40]] for p in root.iterdir()}))
    assert main(["eval", "lost", model, "--dataset", str(root), "--boxes", str(boxes), "--k", "3",
                 "--out", str(out / "l.json")]) == 0
    result = json.loads((out / "l.json").read_text())
    assert result["n"] == 3 and result["unreadable"] == 2 and skipped in capsys.readouterr().out
