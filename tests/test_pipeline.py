"""One pipeline: `retrofit fit` and `retrofit()` train and export alike, the export runs at its training size,
the card names the true source, and sharing or listing commands loads no more than it needs."""

import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from retrofit.api import retrofit
from retrofit.backbones import sha256
from retrofit.cli import main
from retrofit.fit_cli import fit_config
from retrofit.module import RetrofitModule
from retrofit.pipeline import MAX_STEPS, auto_precision, trainer

from .helpers import SIZE, perturb_, tiny_model_dir, write_images

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    return {"root": root, "model": tiny_model_dir(root / "original"), "images": write_images(root / "images", 8)}


def test_cli_and_api_with_the_same_settings_write_bit_identical_exports(workspace: dict[str, Path]) -> None:
    """Neither states the image size, precision or seed: the defaults are the same ones."""
    root, model, images = workspace["root"], str(workspace["model"]), str(workspace["images"])
    args = ["fit", "--model.backbone", model, "--data.source", images, "--model.num_registers", "2",
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.max_steps", "3",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root / "cli")]
    with redirect_stdout(io.StringIO()):
        assert main(args) == 0
    returned = retrofit(model, images, out_dir=root / "api" / "model", num_registers=2, batch_size=4, num_workers=0,
                        max_steps=3, accelerator="cpu", enable_progress_bar=False)
    cli, api = root / "cli" / "lightning_logs" / "version_0" / "model", root / "api" / "model"
    files = sorted(p.name for p in cli.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"] == sorted(p.name for p in api.iterdir())
    for name in files:
        assert (cli / name).read_bytes() == (api / name).read_bytes(), name
    info = json.loads((api / "config.json").read_text())["retrofit"]
    assert (info["step"], info["img_size"]) == (3, SIZE)  # the backbone's own size, by default in both
    weights = load_file(api / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in returned.state_dict().items())  # the returned model is it


def test_defaults_are_defined_once() -> None:
    config = fit_config(["--model.backbone", "test_vit", "--data.source", "."])
    assert config.trainer.max_steps == MAX_STEPS == 1000 and config.trainer.precision == "auto"
    assert config.data.img_size is None  # the backbone's own size, as in retrofit()
    run = trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert run.max_steps == MAX_STEPS and run.precision == "32-true"


@pytest.mark.parametrize(("cuda", "capability", "accelerator", "expected"), [
    (True, (9, 0), "auto", "bf16-mixed"), (True, (8, 0), "gpu", "bf16-mixed"), (True, (7, 0), "auto", "16-mixed"),
    (True, (9, 0), "cpu", "32-true"), (False, None, "auto", "32-true"),
])
def test_precision_auto_follows_the_device(cuda, capability, accelerator, expected, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert auto_precision(accelerator) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_auto_on_this_gpu() -> None:
    native = torch.cuda.get_device_capability() >= (8, 0)
    run = trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False)
    assert run.precision == ("bf16-mixed" if native else "16-mixed")


PLAIN_TIMM = textwrap.dedent("""
    import sys, timm, torch
    from safetensors.torch import load_file, save_file
    export, images, result = sys.argv[1:4]
    model = timm.create_model("local-dir:" + export, pretrained=True).eval()
    x = load_file(images)
    with torch.no_grad():
        tokens = {k: model.forward_features(v)[:, model.num_prefix_tokens:].contiguous() for k, v in x.items()}
    save_file(tokens, result)
    assert not any(m.startswith("retrofit") for m in sys.modules), "retrofit was imported"
""")


def test_a_fit_from_a_local_checkpoint_at_96_px_runs_in_plain_timm_at_96_px(tmp_path: Path,
                                                                             workspace: dict[str, Path]) -> None:
    """test_vit is built for 160 px; trained at 96, its export is built for 96 (and runs at other sizes too), and
    its card names the checkpoint file, its hash and no license."""
    weights = tmp_path / "mine.safetensors"
    save_file(perturb_(timm.create_model("test_vit", pretrained=False)).state_dict(), str(weights))
    args = ["fit", "--model.backbone", "test_vit", "--model.checkpoint", str(weights), "--data.img_size", "96",
            "--data.source", str(workspace["images"]), "--data.batch_size", "4", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    with redirect_stdout(io.StringIO()):
        assert main(args) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    export = run / "model"
    config = json.loads((export / "config.json").read_text())
    assert config["model_args"]["img_size"] == [96, 96] and config["model_args"]["dynamic_img_size"] is True
    assert config["pretrained_cfg"]["input_size"] == [3, 96, 96] and "license" not in config["pretrained_cfg"]
    assert config["retrofit"]["source"] == {"model": "test_vit", "file": "mine.safetensors", "sha256": sha256(weights)}

    card = (export / "README.md").read_text()
    assert "license:" not in card.split("---\n")[1] and "huggingface.co/timm" not in card
    for line in (f"**Source model:** `test_vit`, weights from the local file `mine.safetensors` (sha256 "
                 f"`{sha256(weights)}`)", "**Resolution:** 96 x 96 px (the training size)",
                 "- Image size: 96 x 96 (other sizes too: dynamic_img_size)"):
        assert line in card

    images = {"x96": torch.randn(2, 3, 96, 96), "x144": torch.randn(1, 3, 144, 144)}
    save_file(images, str(tmp_path / "x.safetensors"))
    (tmp_path / "plain.py").write_text(PLAIN_TIMM)
    subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(export), str(tmp_path / "x.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, cwd=tmp_path)
    plain = load_file(tmp_path / "out.safetensors")
    trained, _ = RetrofitModule.from_checkpoint(next((run / "checkpoints").glob("*.ckpt")))
    with torch.no_grad():  # what training computed at 96 px: the 160 px model resampled on the fly
        student = trained.forward(images["x96"]).flatten(1, 2)
    assert torch.equal(plain["x96"], student)
    assert plain["x144"].shape == (1, 81, 64) and torch.isfinite(plain["x144"]).all()


IMPORTS = textwrap.dedent("""
    import json, sys
    import retrofit
    after_import = sorted(sys.modules)
    model = retrofit.load_backbone(sys.argv[1])
    retrofit.load(retrofit.export(retrofit.add_registers(model, 2), sys.argv[2]))
    from retrofit.hub import push_to_hub
    print(json.dumps({"import": after_import, "share": sorted(sys.modules)}))
""")
HELP = "import json, sys; from retrofit.cli import main; main(['--help']); print(json.dumps(sorted(sys.modules)))"
HEAVY = ("torch", "timm", "lightning", "matplotlib", "datasets", "peft")
INSPECTION = ("matplotlib", "retrofit.plots", "retrofit.maps", "retrofit.diagnose", "retrofit.page", "lightning")


def test_sharing_needs_no_inspection_and_help_needs_no_torch(tmp_path: Path, workspace: dict[str, Path]) -> None:
    """`import retrofit` and `retrofit --help` load none of the heavy libraries; loading, exporting and pushing a
    model load no plotting, report or training code."""
    out = subprocess.run([sys.executable, "-c", IMPORTS, str(workspace["model"]), str(tmp_path / "exp")],
                         check=True, capture_output=True, text=True, cwd=REPO).stdout
    loaded = json.loads(out.splitlines()[-1])
    assert not [m for m in HEAVY if m in loaded["import"]]
    assert "timm" in loaded["share"] and not [m for m in INSPECTION if m in loaded["share"]]

    out = subprocess.run([sys.executable, "-c", HELP], check=True, capture_output=True, text=True, cwd=REPO).stdout
    listing, modules = out.rsplit("\n", 2)[0], json.loads(out.splitlines()[-1])
    assert all(f"    {command} " in listing for command in ("fit", "diagnose", "export", "recipes"))
    assert not [m for m in HEAVY if m in modules]
