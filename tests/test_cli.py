"""The `retrofit` CLI end to end, in process, on a tiny test_vit and made-up images (no downloads)."""

import csv
import io
import json
import logging
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator  # the dev extra installs it

from retrofit import load, patch_features
from retrofit.cli import console, join_number_lists, main
from retrofit.fit_cli import fit_config
from retrofit.steps import log_interval
from retrofit.surgery import count_registers

from .helpers import SIZE, lightning_prints_to_stderr, tiny_model_dir, uniform_vit_dir, write_images

COMMANDS = (["fit"], ["diagnose"], ["eval", "lost"], ["eval", "probe"], ["export"], ["demo"], ["recipes"], ["recipe"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    return {"root": root, "model": tiny_model_dir(root / "original"), "images": write_images(root / "images", 8)}


def fit_args(ws: dict[str, Path], run: str, *extra: str, backbone: Path | None = None) -> list[str]:
    return [
        "fit", "--model.backbone", str(backbone or ws["model"]), "--data.source", str(ws["images"]),
        "--data.img_size", str(SIZE), "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(ws["root"] / run), *extra,
    ]


@pytest.fixture(scope="module")
def fitted(workspace: dict[str, Path]) -> tuple[Path, str]:
    """One short fit with command-line overrides and the map and artifact callbacks; returns its log dir and
    what it printed."""
    monitors = ["--trainer.callbacks+=retrofit.callbacks.NormMapLogger", "--trainer.callbacks.every_n_steps=2",
                "--trainer.callbacks.max_images=1",
                "--trainer.callbacks+=retrofit.callbacks.ArtifactMonitor", "--trainer.callbacks.every_n_steps=1"]
    with redirect_stdout(io.StringIO()) as printed:  # the progress bar's console and ours both write to stdout
        assert main(fit_args(workspace, "run", "--model.num_registers", "2", "--model.lr", "3e-4", *monitors)) == 0
    return workspace["root"] / "run" / "lightning_logs" / "version_0", printed.getvalue()


@pytest.fixture(scope="module")
def compared(fitted: tuple[Path, str], workspace: dict[str, Path]) -> tuple[Path, str]:
    """`retrofit diagnose` of the fitted model against its original in an 80-column terminal; returns the
    output folder and what it printed."""
    out = workspace["root"] / "diagnose"
    args = ["diagnose", str(fitted[0] / "model"), "--images", str(workspace["images"]),
            "--compare", str(workspace["model"]), "--out", str(out), "--max_images", "3"]
    with pytest.MonkeyPatch.context() as patch, console.capture() as printed:
        patch.setattr(console, "width", 80)
        assert main(args) == 0
    return out, printed.get()


def test_fit_saves_resolved_config_checkpoint_metrics_and_timm_export(fitted: tuple[Path, str]) -> None:
    run, _ = fitted
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["num_registers"] == 2 and config["model"]["lr"] == 3e-4  # overrides resolved
    assert config["trainer"]["max_steps"] == 2
    model = load(run / "model")
    assert count_registers(model) == 2
    info = json.loads((run / "model" / "config.json").read_text())["retrofit"]
    assert (info["step"], info["freeze"], info["img_size"]) == (2, "auto", SIZE)  # the run, for the model card
    assert "**Registers:** 2" in (run / "model" / "README.md").read_text()
    assert list((run / "checkpoints").glob("*.ckpt"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))  # the README promises it beside TensorBoard's
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1]
    assert all(0 < float(r["train/cosine"]) <= 1 for r in rows if r.get("train/cosine"))


def test_progress_counts_steps_not_epochs(fitted: tuple[Path, str]) -> None:
    _, printed = fitted
    assert "step 2/2 (epoch 0)" in printed and "Epoch" not in printed and "v_num" not in printed
    assert "loss:" in printed and "train/" not in printed  # the captured console is 80 columns: the loss alone


def test_export_of_checkpoint_equals_fit_export(fitted: tuple[Path, str], workspace: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = next((fitted[0] / "checkpoints").glob("*.ckpt"))
    out = workspace["root"] / "exported"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert "2 registers in total, step 2" in capsys.readouterr().out
    info = json.loads((out / "config.json").read_text())["retrofit"]
    assert info["step"] == 2 and info["num_registers"] == 2 and info["backbone"] == str(workspace["model"])
    fits = json.loads((fitted[0] / "model" / "config.json").read_text())["retrofit"]
    assert info["source"] == fits["source"] and info["source"]["file"] == "original/model.safetensors"  # kept
    images = torch.randn(2, 3, SIZE, SIZE)
    ours, fits = load(out), load(fitted[0] / "model")
    torch.testing.assert_close(patch_features(ours, images), patch_features(fits, images), rtol=0, atol=0)
    original = load(workspace["model"])
    assert not torch.equal(patch_features(ours, images), patch_features(original, images))  # it did train
    assert main(["export", str(ckpt), "--out", str(out)]) == 1  # existing output kept without --overwrite
    assert capsys.readouterr().err == (f"retrofit: error: {out} already exists and is not empty: choose another "
                                       "directory, or replace it with --overwrite true (overwrite=True in Python).\n")


EXPORT_ONLY = ("import json, sys; from retrofit.cli import main; code = main(sys.argv[1:]); "
               "print(json.dumps([code, sorted(sys.modules)]))")


def test_export_command_loads_none_of_retrofits_plotting_code(fitted: tuple[Path, str], tmp_path: Path) -> None:
    ckpt = next((fitted[0] / "checkpoints").glob("*.ckpt"))
    out = subprocess.run([sys.executable, "-c", EXPORT_ONLY, "export", str(ckpt), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent).stdout
    code, modules = json.loads(out.splitlines()[-1])
    assert code == 0 and (tmp_path / "m" / "model.safetensors").is_file()
    # (matplotlib itself comes with torchmetrics, which the training module's metrics import)
    assert not [m for m in ("retrofit.plots", "retrofit.maps", "retrofit.diagnose", "retrofit.page") if m in modules]


def test_registers_added_to_a_model_that_has_some_are_announced_and_counted(
    fitted: tuple[Path, str], workspace: dict[str, Path], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        args = fit_args(workspace, "stacked", "--model.num_registers", "1", "--trainer.max_steps", "1",
                        backbone=fitted[0] / "model")
        assert main(args) == 0
    assert "already has 2 registers: adding 1 more, 3 in total" in caplog.text
    ckpt = next((workspace["root"] / "stacked").rglob("*.ckpt"))
    assert main(["export", str(ckpt), "--out", str(workspace["root"] / "stacked_export")]) == 0
    assert "3 registers in total" in capsys.readouterr().out
    config = json.loads((workspace["root"] / "stacked_export" / "config.json").read_text())
    assert config["model_args"]["reg_tokens"] == config["retrofit"]["num_registers"] == 3


def test_export_with_the_wrong_backbone_is_one_line(fitted: tuple[Path, str], workspace: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = next((fitted[0] / "checkpoints").glob("*.ckpt"))
    out = workspace["root"] / "wrong"
    assert main(["export", str(ckpt), "--out", str(out), "--backbone", "deit3_small_patch16_224"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit a deit3_small_patch16_224 student" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--model.bogus", "1"], "unrecognized arguments: --model.bogus"),
        (["--model.num_registers", "four"], '"model.num_registers"'),
        (["--model.freeze", "bogus"], '"model.freeze"'),
        (["--trainer.max_steps", "1.5"], '"trainer.max_steps"'),
        # an abbreviation is an unknown option, with the nearest real one suggested
        (["--model.num_register", "4"], "--model.num_register 4; did you mean --model.num_registers?"),
        (["--data.img_siz", "32"], "did you mean --data.img_size?"),
        (["--config", "dinov2_vitb14_reg5"], "no recipe or config file 'dinov2_vitb14_reg5'"),
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
    assert "Traceback" not in err and ("`retrofit fit --help`" in err or "recipe" in err)


def test_bad_key_in_config_file_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backbone: test_vit\n  num_registrs: 4\n")
    assert main(["fit", "--config", str(config), "--data.source", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'num_registrs'" in err and "'model'" in err, err


def test_offline_fit_fails_fast_naming_fits_flag(workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert main(fit_args(workspace, "offline", backbone=Path("test_vit"))) == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 30
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err and "--model.checkpoint PATH in retrofit fit" in err


@pytest.mark.parametrize("wrong", ["data", "ckpt"])
def test_errors_before_training_come_before_anything_lightning_prints(
    wrong: str, workspace: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    lightning_prints_to_stderr(monkeypatch)
    gone, empty = workspace["root"] / "gone", workspace["root"] / "empty"
    empty.mkdir(exist_ok=True)
    extra = {"data": ["--data.source", str(empty)], "ckpt": ["--ckpt_path", f"{gone}.ckpt"]}[wrong]
    assert main(fit_args(workspace, "early", *extra)) == 1
    expected = {"data": f"no images in {empty}: expected files ending in .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff.",
                "ckpt": f"checkpoint {gone}.ckpt does not exist: pass a .ckpt from a run's checkpoints folder."}
    assert capsys.readouterr().err.splitlines() == [f"retrofit: error: {expected[wrong]}"]  # no "Seed set to 0" first


def test_log_interval_is_lightnings_unless_the_run_is_short() -> None:
    assert [log_interval(n) for n in (3, 40, 499, 500, 1000, 5000, -1)] == [1, 4, 49, 50, 50, 50, 50]


def test_a_short_run_with_default_logging_writes_metrics_and_its_resume_warns_about_nothing(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder,
) -> None:
    monkeypatch.chdir(workspace["root"])  # a relative run folder, as a person types it
    args = fit_args(workspace, "", "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "null",
                    "--trainer.default_root_dir", "short")
    with redirect_stdout(io.StringIO()):
        assert main(args) == 0  # 8 images in batches of 4: 2 batches per epoch, fewer than the logging interval
        run = Path("short/lightning_logs/version_0")
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(2, 30, 3))  # every 3rd of 30
        ckpt = next((run / "checkpoints").glob("*.ckpt"))
        assert main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_steps", "33", "--ckpt_path",
                     str(ckpt)]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(2, 33, 3))  # appended to, in place
    noise = ("smaller than the logging interval", "exists and is not empty")
    assert not [str(w.message) for w in recwarn if any(n in str(w.message) for n in noise)]


def test_print_config_resolves_overrides(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(fit_args(workspace, "print", "--model.num_registers", "16", "--print_config")) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["num_registers"] == 16 and config["data"]["img_size"] == SIZE


def test_recipe_name_as_config_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "dinov2_vitb14_reg4", "--data.source", ".", "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["backbone"] == "vit_base_patch14_dinov2.lvd142m" and config["model"]["num_registers"] == 4


def test_fit_config_validates_without_building(workspace: dict[str, Path]) -> None:
    config = fit_config(fit_args(workspace, "x")[1:] + ["--model.targets.num_views", "3"])
    assert config.model.targets.num_views == 3 and config.model.freeze == "auto"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        assert main([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert re.match(r"usage: retrofit (\[options\] )?" + r" (\[options\] )?".join(command), out), command
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(f"    {c[0]} " in listing for c in COMMANDS)
    assert not re.search(r"^  --(config|print_config)|\[--config", listing, re.M)  # they did nothing there


def test_fit_help_names_the_options_without_listing_classes(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "--model.num_registers" in out and "--trainer.max_steps" in out and "default: 1000" in " ".join(out.split())
    assert "torch.nn.modules" not in out and len(lines) < 600  # was 2,170 lines: every nn.Module
    first = {o: next(i for i, line in enumerate(lines) if line.lstrip().startswith(o))
             for o in ("--model.", "--data.", "--trainer.")}
    assert first["--model."] < 40 and first["--model."] < first["--data."] < first["--trainer."]  # was line 473
    assert not re.search(r"``|:(func|mod|class|meth):|configure_for", out), "Sphinx markup or internals"
    assert max(len(line) for line in lines) <= 80 and lines[0].startswith("usage: retrofit fit [--config RECIPE")
    assert main(["fit", "--model.targets.help", "TargetSettings"]) == 0  # field docstrings of TargetSettings
    assert "Views per image, the unshifted one included" in capsys.readouterr().out


def test_unknown_command_and_missing_model_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 1
    assert main(["diagnose", str(tmp_path / "nope.safetensors"), "--images", str(tmp_path)]) == 1
    assert main(["diagnose", "test_vit", "--image", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "invalid choice: 'trian'" in lines[0] and "--checkpoint PATH elsewhere" in lines[1]
    assert "did you mean --images?" in lines[2]


@pytest.mark.parametrize(
    ("given", "read"),
    [(["11"], ["--layers=[11]"]), (["4", "11"], ["--layers=[4,11]"]), (["-1"], ["--layers=[-1]"]),
     (["4,11"], ["--layers=[4,11]"]), (["[4, 11]"], ["--layers", "[4, 11]"]), (["=4,11"], ["--layers=[4,11]"])],
)
def test_layers_take_plain_numbers(given: list[str], read: list[str]) -> None:
    args = ["diagnose", "m", "--layers", *given, "--k", "2"]
    if given[0].startswith("="):
        args[2:4] = [f"--layers{given[0]}"]
    assert join_number_lists(args, {"--layers"}) == ["diagnose", "m", *read, "--k", "2"]


def test_diagnose_layers_as_a_person_types_them(workspace: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out, model, images = workspace["root"] / "layers", str(workspace["model"]), str(workspace["images"])
    args = ["diagnose", model, "--images", images, "--out", str(out), "--max_images", "2"]
    assert main([*args, "--layers", "4", "-1"]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert [entry["layer"] for entry in report["models"][0]["layers"]] == [4, 5]
    assert main([*args, "--layers", "four"]) == 1
    assert capsys.readouterr().err == ("retrofit: error: invalid configuration: --layers does not take 'four': it "
                                       "takes list[int] or null (`retrofit diagnose --help` lists the options).\n")
    assert main(["diagnose", "--help"]) == 0
    assert "e.g. --layers 11 or --layers 4 11" in " ".join(capsys.readouterr().out.split())


def test_diagnose_compare_writes_json_pngs_and_page_and_fits_80_columns(compared: tuple[Path, str]) -> None:
    out, printed = compared
    report = json.loads((out / "diagnose.json").read_text())
    assert [m["num_registers"] for m in report["models"]] == [2, 0]
    assert [m["label"] for m in report["models"]] == ["model", "original"]
    assert len(list(out.glob("0*_img*.png"))) >= 3 and len(report["images"]) == 3
    assert 0 < report["cosine"]["p5"] <= report["cosine"]["mean"] <= 1
    assert (out / "index.html").read_text().count('<img src="data:image/png;base64,') == 7  # + residual.png
    table = printed.split("wrote ")[0]  # the last line names paths and is left for the terminal to wrap
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 80
    last = report["models"][0]["layers"][-1]
    assert f"{last['max']:.3g}" in table and f"{100 * last['high']:.2f}%" in table


def test_fit_sends_maps_and_scalars_to_tensorboard(fitted: tuple[Path, str]) -> None:
    run, _ = fitted
    events = event_accumulator.EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    maps = events.Images("norm_maps")
    assert [m.step for m in maps] == [0, 2]  # before training and every 2 steps
    image = np.asarray(Image.open(io.BytesIO(maps[-1].encoded_image_string)))
    assert image.shape == (maps[-1].height, maps[-1].width, 3) and image.std() > 10  # a figure, not a blank
    outliers = events.Scalars("artifacts/outlier_high")
    assert [s.step for s in outliers] == [0, 1, 2] and all(0 <= s.value <= 1 for s in outliers)  # every step
    assert not (run / "norm_maps").exists()  # TensorBoard took the maps: no PNG fallback


def test_fit_push_without_a_token_fails_before_any_model_is_built(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("retrofit.hub.get_token", lambda: None)
    assert main(fit_args(workspace, "unpushed", "--push_to_hub", "user/tiny")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pushing to user/tiny needs a Hugging Face token" in err[0]
    assert not (workspace["root"] / "unpushed").exists()  # no run folder, no logs: nothing was started


def test_export_with_diagnose_card_and_push(fitted: tuple[Path, str], compared: tuple[Path, str],
                                            workspace: dict[str, Path], fake_hub) -> None:
    ckpt = next((fitted[0] / "checkpoints").glob("*.ckpt"))
    out = workspace["root"] / "pushed"
    assert main(["export", str(ckpt), "--out", str(out), "--diagnose", str(compared[0]),
                 "--push_to_hub", "user/tiny-reg2"]) == 0
    info = json.loads((out / "config.json").read_text())["retrofit"]
    assert (info["step"], info["batch_size"], info["img_size"], info["train_images"]) == (2, 4, SIZE, 8)
    card = (out / "README.md").read_text()
    assert "| high-norm outlier tokens" in card and "**Images:** 8 seen (4 per step), 8 distinct" in card
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "user/tiny-reg2" and upload["files"]["README.md"].decode() == card
    assert json.loads(upload["files"]["config.json"])["model_args"]["reg_tokens"] == 2


def test_eval_lost_and_probe_give_the_known_answers(workspace: dict[str, Path]) -> None:
    root, images = workspace["root"], workspace["images"]
    uniform = uniform_vit_dir(root / "uniform")  # LOST finds the whole image; the probe, one class everywhere
    names = sorted(p.name for p in images.glob("*.png"))
    whole, corner = [0, 0, SIZE, SIZE], [0, 0, SIZE // 8, SIZE // 8]
    boxes = {name: [whole if i < 4 else corner] for i, name in enumerate(names)}
    (root / "boxes.json").write_text(json.dumps(boxes))
    lost_out = root / "lost.json"
    args = ["eval", "lost", str(uniform), "--dataset", str(images), "--boxes", str(root / "boxes.json"),
            "--k", "3", "--out", str(lost_out)]
    assert main(args) == 0
    lost = json.loads(lost_out.read_text())
    assert [p["box"] for p in lost["per_image"]] == [whole] * 8
    assert [p["iou"] for p in lost["per_image"]] == pytest.approx([1.0] * 4 + [1 / 64] * 4)
    assert (lost["n"], lost["corloc"]) == (8, 0.5)  # the whole image is found; the corner boxes are missed

    seg = root / "seg"
    write_images(seg / "images", 6)
    (seg / "masks").mkdir()
    for i in range(6):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[SIZE * 3 // 4:] = 1  # a quarter of each image is class 1
        Image.fromarray(mask).save(seg / "masks" / f"img{i:02d}.png")
    probe_out = root / "probe.json"
    args = ["eval", "probe", str(uniform), "--train", str(seg), "--val", str(seg), "--num_classes", "2",
            "--epochs", "5", "--lr", "0.1", "--out", str(probe_out)]
    assert main(args) == 0
    probe = json.loads(probe_out.read_text())
    assert probe["n_train"] == 6 and probe["per_class_iou"] == [0.75, 0.0]  # class 0 everywhere: 3/4 right
    assert (probe["miou"], probe["accuracy"]) == (0.375, 0.75)


def test_eval_on_a_folder_without_annotations_names_the_option_that_gives_them(
    workspace: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    model, images = str(workspace["model"]), workspace["images"]
    assert main(["eval", "lost", model, "--dataset", str(images)]) == 1
    assert main(["eval", "probe", model, "--train", str(images), "--val", str(images), "--num_classes", "2"]) == 1
    assert capsys.readouterr().err.splitlines() == [  # not "set boxes_column to one of image", after HF's progress
        f"retrofit: error: {images} holds images but no boxes: pass --boxes FILE (boxes= in Python) with a JSON "
        f'{{"relative/path.jpg": [[x0, y0, x1, y1], ...]}}, or save that file as {images}/boxes.json.',
        f"retrofit: error: {images} holds images but no masks: put the images in {images}/images and their masks "
        f"in {images}/masks (same relative paths), or pass masks= in Python.",
    ]


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

