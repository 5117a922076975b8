"""Synthetic images and the realistic artifact model: made by MLP units, content x position, read by later blocks."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from retrofit import RetrofitError, export, load, patch_features
from retrofit.metrics import outlier_mask, patch_cosine
from retrofit.synthetic import plant_artifacts, synthetic_images

SIZE, PATCH = 64, 8
NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)  # test_vit's normalisation


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    clean = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH).eval()
    snapshot = copy.deepcopy(clean.state_dict())
    return clean, snapshot, plant_artifacts(clean), plant_artifacts(clean, silent=True)


@pytest.fixture(scope="module")
def held_out():
    """Held-out images with a one-patch margin, so views shifted by a patch show real pixels."""
    return synthetic_images(48, SIZE + 2 * PATCH, seed=99, **NORM)


def center(images: torch.Tensor, dy: int = 0, dx: int = 0) -> torch.Tensor:
    top, left = PATCH + dy * PATCH, PATCH + dx * PATCH
    return images[..., top:top + SIZE, left:left + SIZE]


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


def test_artifacts_fraction_strength_and_onset(models, held_out):
    clean, snapshot, planted, _ = models
    x = center(held_out)
    with torch.no_grad():
        out = patch_features(planted, x)
        per_layer = patch_features(planted, x, layers=list(range(6)))
        assert outlier_mask(patch_features(clean, x)).sum() == 0
    artifacts = outlier_mask(out)
    assert 0.015 <= artifacts.float().mean().item() <= 0.05  # a few percent of held-out tokens
    assert ratio_to_median(out).flatten()[artifacts.flatten()].median() >= 6  # about 8x the median norm
    for layer in range(6):  # block 2 (a third of the depth) makes them; the same tokens stand out after it
        fraction = outlier_mask(per_layer[layer]).float().mean().item()
        assert fraction == 0 if layer < 2 else fraction > 0.01
    assert (outlier_mask(per_layer[2]) & artifacts).sum() >= 0.8 * artifacts.sum()
    for key, value in clean.state_dict().items():  # the input model is not touched
        assert torch.equal(value, snapshot[key])


def test_a_few_mlp_units_make_them_and_the_twin_lacks_only_their_output(models, held_out):
    _, _, planted, silent = models
    changed = {k for k, v in planted.state_dict().items() if not torch.equal(v, silent.state_dict()[k])}
    assert changed == {"blocks.2.mlp.fc2.weight"}
    units = (planted.blocks[2].mlp.fc2.weight != silent.blocks[2].mlp.fc2.weight).any(dim=0).nonzero().flatten()
    assert 2 <= len(units) <= 8  # a few units of 192
    with torch.no_grad():
        assert outlier_mask(patch_features(silent, center(held_out))).sum() == 0


def test_artifacts_sit_on_flat_patches_and_partly_follow_the_grid(models, held_out):
    """Low-information patches fire them, and position decides too: a one-patch shift of the content keeps
    roughly half of them (real models: ~40%)."""
    _, _, planted, _ = models
    with torch.no_grad():
        artifacts = outlier_mask(patch_features(planted, center(held_out)))
        shifted = {s: outlier_mask(patch_features(planted, center(held_out, *s))) for s in [(0, 1), (1, 0)]}
    cells = F.unfold(center(held_out), PATCH, stride=PATCH).unflatten(1, (3, -1))
    spread = cells.std(dim=2).mean(dim=1).view_as(artifacts)  # per-channel pixel std
    flat = spread < 1e-3
    assert flat[artifacts].float().mean() > flat.float().mean() + 0.2  # mostly on the flat background
    kept = []
    for (dy, dx), moved in shifted.items():  # the content of patch (i, j) is at (i - dy, j - dx) in the shifted view
        a, b = artifacts[:, dy:, dx:], moved[:, : SIZE // PATCH - dy, : SIZE // PATCH - dx]
        kept.append(((a & b).sum() / a.sum()).item())
    assert 0.15 < sum(kept) / len(kept) < 0.75


def test_artifacts_change_the_other_tokens_through_attention(models, held_out):
    """The network reads what the units write: neighbours change, an artifact loses its own content."""
    _, _, planted, silent = models
    x = center(held_out)
    with torch.no_grad():
        out, ref = patch_features(planted, x), patch_features(silent, x)
    artifacts = outlier_mask(out)
    near = F.max_pool2d(artifacts.float()[:, None], 3, 1, 1)[:, 0].bool() & ~artifacts
    cos = patch_cosine(out, ref)
    assert cos[artifacts].mean() < 0.3
    assert 0.9 < cos[~artifacts].mean() < 0.985  # about 0.95 by construction
    assert cos[near].mean() < cos[~artifacts & ~near].mean()


def test_plant_at_a_second_resolution_and_export(models, tmp_path):
    _, _, planted, _ = models
    bigger = synthetic_images(16, 96, seed=5, **NORM)
    with torch.no_grad():
        fraction = outlier_mask(patch_features(planted, bigger)).float().mean().item()
    assert 0.005 < fraction < 0.1  # the position embedding is resampled, the circuit keeps working
    loaded = load(export(planted, tmp_path / "planted"))
    with torch.no_grad():
        torch.testing.assert_close(patch_features(loaded, bigger), patch_features(planted, bigger))
    assert type(loaded) is type(planted) and not loaded._forward_pre_hooks


def test_plant_rejects_bad_settings():
    model = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH)
    with pytest.raises(RetrofitError, match="block must be in 1..5"):
        plant_artifacts(model, block=6)
    with pytest.raises(RetrofitError, match="strength"):
        plant_artifacts(model, strength=0.5)
    with pytest.raises(RetrofitError, match="calibration images must be"):
        plant_artifacts(model, images=torch.zeros(2, 3, 32, 32))
