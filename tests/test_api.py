"""retrofit(): planted artifacts removed end to end, image folders, export round trip, argument routing."""

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from retrofit import RetrofitError, count_registers, load, patch_features
from retrofit.api import retrofit
from retrofit.data import RetrofitDataModule
from retrofit.metrics import patch_cosine
from retrofit.residual import artifact_tokens, residual_profile
from retrofit.synthetic import plant_artifacts, synthetic_images
from retrofit.targets import crop_center

from .helpers import lightning_prints_to_stderr

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)  # test_vit's normalisation


def test_planted_artifacts_are_repaired_and_the_export_round_trips(tmp_path):
    """The defaults repair the artifact model where artifacts build over two blocks (two unit groups each) and the
    final norm does not show them: held-out features match its artifact-free twin, at the artifacts too, and at a
    resolution it was not trained at; no block of the residual stream makes outliers any more."""
    torch.manual_seed(0)
    clean = timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8).eval()
    form = dict(blocks=[2, 3], groups=2, seed=2)
    planted, twin = plant_artifacts(clean, **form), plant_artifacts(clean, **form, silent=True)
    train = synthetic_images(48, 80, seed=1, **NORM)  # 64 px for the student + a 1-patch margin
    model = retrofit(  # a random-init toy learns faster than a pretrained ViT: a higher lr than the default
        planted, train, out_dir=tmp_path / "export", max_steps=100, batch_size=16, random_crop=False,
        lr=3e-3, min_lr=1.5e-4, cache_dir=str(tmp_path / "cache"), **QUIET,
    )
    for held in (crop_center(synthetic_images(32, 80, seed=2, **NORM), 8), synthetic_images(16, 96, seed=3, **NORM)):
        with torch.no_grad():
            before, after, truth = (patch_features(m, held) for m in (planted, model, twin))
            torch.testing.assert_close(patch_features(load(tmp_path / "export"), held), after)
        artifacts = artifact_tokens(planted, held)
        assert artifacts.float().mean() >= 0.005 and max(residual_profile(model, held)[0].outliers) < 0.005
        cos = patch_cosine(after, truth)
        assert cos.mean() >= 0.97 and cos[artifacts].mean() >= 0.9
    assert count_registers(model) == 4 and not model.training


def test_image_folder_end_to_end(tmp_path):
    pixels = (synthetic_images(6, 40, seed=3, mean=(0,) * 3, std=(1,) * 3) * 255).round().byte()
    for i, image in enumerate(pixels):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8).eval()
    model = retrofit(teacher, tmp_path, out_dir=tmp_path / "out", num_registers=2, max_steps=2, batch_size=3,
                     lr=1e-2, min_lr=1e-3, **QUIET)
    x = synthetic_images(2, 32, seed=4, **NORM)
    with torch.no_grad():
        torch.testing.assert_close(patch_features(load(tmp_path / "out"), x), patch_features(model, x))
        assert not torch.equal(patch_features(model, x), patch_features(teacher, x))
    assert count_registers(model) == 2


def test_a_bad_data_source_fails_before_the_trainer_says_anything(tmp_path, capsys, monkeypatch):
    lightning_prints_to_stderr(monkeypatch)
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8)
    with pytest.raises(RetrofitError, match=f"^no images in {tmp_path}: expected files ending in .jpg"):
        retrofit(teacher, tmp_path, max_steps=1, **QUIET)
    assert capsys.readouterr().err == ""  # not "GPU available: False, used: False" first


def test_settings_are_routed_or_rejected():
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8)
    images = synthetic_images(2, 32)
    with pytest.raises(RetrofitError, match="unknown setting.*learning_rate"):
        retrofit(teacher, images, learning_rate=1e-3)
    with pytest.raises(RetrofitError, match="batch_size were given with a ready RetrofitDataModule"):
        retrofit(teacher, RetrofitDataModule.from_tensor(images), batch_size=4)
    with pytest.raises(RetrofitError, match="data of type list"):
        retrofit(teacher, [images])


def test_push_without_out_dir_uploads_a_scratch_export_whose_card_records_no_source(fake_hub, monkeypatch):
    teacher = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8).eval()
    model = retrofit(teacher, synthetic_images(4, 32, **NORM), push_to_hub="user/reg2", num_registers=2,
                     max_steps=1, batch_size=2, **QUIET)
    (upload,) = fake_hub.uploads
    config = json.loads(upload["files"]["config.json"])
    assert config["model_args"]["reg_tokens"] == 2 and config["retrofit"]["step"] == 1
    assert config["retrofit"]["train_images"] == 4 and config["retrofit"]["img_size"] == 32
    card = upload["files"]["README.md"].decode()
    assert "# Model card for reg2" in card
    # an in-memory pretrained=False module: its source is not recorded, and timm's default license is not its own
    assert "**Source model:** `test_vit` (not recorded: an in-memory model)" in card
    assert "license:" not in card.split("---\n")[1] and "license" not in config["pretrained_cfg"]
    assert config["retrofit"]["source"] == {}
    weights = load_safetensors(upload["files"]["model.safetensors"])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("retrofit.hub.get_token", lambda: None)
    with pytest.raises(RetrofitError, match="needs a Hugging Face token"):
        retrofit(teacher, synthetic_images(4, 32, **NORM), push_to_hub="user/reg2", max_steps=1, **QUIET)
