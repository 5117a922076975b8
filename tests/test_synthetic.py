"""Synthetic images and the planted-artifact model: fractions, strengths, isolation, export."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from retrofit import RetrofitError, export, load, patch_features
from retrofit.metrics import outlier_mask, patch_cosine
from retrofit.synthetic import plant_artifacts, synthetic_images

SIZE, PATCH = 64, 8


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    clean = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH).eval()
    snapshot = copy.deepcopy(clean.state_dict())
    return clean, snapshot, plant_artifacts(clean), plant_artifacts(clean, silent=True)


@pytest.fixture(scope="module")
def held_out():
    return synthetic_images(24, SIZE, seed=99, mean=(0.5,) * 3, std=(0.5,) * 3)


def ratio_to_median(grid: torch.Tensor) -> torch.Tensor:
    norms = grid.norm(dim=-1).flatten(1)
    return norms / norms.median(dim=1, keepdim=True).values


def test_synthetic_images_are_seeded_with_flat_backgrounds():
    a = synthetic_images(8, 32, seed=1, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(a, synthetic_images(8, 32, seed=1, mean=(0, 0, 0), std=(1, 1, 1)))
    assert not torch.equal(a, synthetic_images(8, 32, seed=2, mean=(0, 0, 0), std=(1, 1, 1)))
    assert a.shape == (8, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    spread = F.unfold(a, PATCH, stride=PATCH).view(8, 3, PATCH * PATCH, -1).std(dim=2).amax(dim=1)
    flat = (spread < 1e-6).float().mean().item()
    assert 0.3 < flat < 0.9  # flat background patches and textured object patches
    assert spread[spread > 1e-6].median() > 0.05  # object patches really vary
    normalised = synthetic_images(8, 32, seed=1, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.testing.assert_close(normalised, (a - 0.5) / 0.25)


def test_planted_artifacts_fraction_strength_and_onset(models, held_out):
    clean, snapshot, planted, _ = models
    with torch.no_grad():
        out = patch_features(planted, held_out)
        per_layer = patch_features(planted, held_out, layers=list(range(6)))
        raw = patch_features(planted, held_out, layers=list(range(6)), norm=False)
        assert outlier_mask(patch_features(clean, held_out)).sum() == 0
    fraction = outlier_mask(out).float().mean().item()
    assert 0.02 <= fraction <= 0.05
    artifacts = outlier_mask(out).flatten(1)
    assert ratio_to_median(out)[artifacts].min() >= 5
    for layer in range(6):  # from block 2 (a third of the depth) on, the same tokens stand out
        normed, residual = ratio_to_median(per_layer[layer]), ratio_to_median(raw[layer])
        if layer < 2:
            assert normed.max() < 3 and residual.max() < 3
        else:
            assert normed[artifacts].min() >= 5 and normed[~artifacts].max() < 3
            assert residual[artifacts].median() >= 5 and residual[~artifacts].max() < 3
    for key, value in clean.state_dict().items():  # the input model is not touched
        assert torch.equal(value, snapshot[key])


def test_silent_twin_is_the_planted_model_without_artifacts(models, held_out):
    _, _, planted, silent = models
    with torch.no_grad():
        out, ref = patch_features(planted, held_out), patch_features(silent, held_out)
    artifacts = outlier_mask(out)
    assert outlier_mask(ref).sum() == 0
    cos = patch_cosine(out, ref)
    assert cos[~artifacts].mean() > 0.999
    assert cos[artifacts].abs().max() < 0.3  # the artifact replaced the token's content


def test_export_and_load_keep_the_artifacts(models, held_out, tmp_path):
    _, _, planted, _ = models
    loaded = load(export(planted, tmp_path / "planted"))
    with torch.no_grad():
        torch.testing.assert_close(patch_features(loaded, held_out), patch_features(planted, held_out))
    assert type(loaded) is type(planted) and not loaded._forward_pre_hooks


def test_plant_rejects_bad_settings():
    model = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH)
    with pytest.raises(RetrofitError, match="block must be in 1..5"):
        plant_artifacts(model, block=6)
    with pytest.raises(RetrofitError, match="strength"):
        plant_artifacts(model, strength=0.5)
