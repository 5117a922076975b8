"""Synthetic images and the realistic artifact model: made by MLP units, content x position, read by later blocks."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from retrofit import RetrofitError, export, load, patch_features
from retrofit.metrics import outlier_mask, patch_cosine
from retrofit.residual import artifact_tokens, made_outliers, residual_norms, residual_profile
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
def spread(models):
    """Artifacts built over blocks 1-3, three unit groups of 4 in each (36 units), the final norm raised."""
    settings = dict(blocks=[1, 2, 3], groups=3, final_norm=True, seed=1)
    return plant_artifacts(models[0], **settings), plant_artifacts(models[0], **settings, silent=True)


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


def changed_units(model, twin) -> dict[int, int]:
    """Block -> how many MLP units write differently in the model and its twin."""
    counts = {b: int((x.mlp.fc2.weight != y.mlp.fc2.weight).any(dim=0).sum())
              for b, (x, y) in enumerate(zip(model.blocks, twin.blocks, strict=True))}
    return {b: n for b, n in counts.items() if n}


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


def test_one_block_makes_them_in_the_residual_stream_and_the_final_norm_may_hide_them(models, held_out):
    """Darcet et al. see artifacts block by block in the raw residual stream: nothing before the block that makes
    them, the same tokens at ~8x the median after it. The final norm, left as it is, may hide them (test_vit's is
    all ones: every output token has the same norm); raised, it shows them at ~8x too."""
    clean, snapshot, planted, _ = models
    x = center(held_out)
    norms = residual_norms(planted, x)
    made = made_outliers(norms)
    fractions = made.float().mean(dim=(0, 2))
    assert fractions[:2].sum() < 0.002 and (fractions[2:] > 0.01).all()  # block 2 (a third of the depth) makes them
    assert residual_profile(planted, x)[0].blocks == [2]
    assert (made[:, 2] == made[:, 5]).float().mean() > 0.99  # the same tokens, carried to the last block
    ratio = norms[:, 3] / norms[:, 3].median(dim=-1, keepdim=True).values
    assert ratio[made[:, 2]].median() >= 6  # about 8x the median norm
    assert max(residual_profile(clean, x)[0].outliers) == 0
    with torch.no_grad():
        assert outlier_mask(patch_features(planted, x)).sum() == 0  # hidden by the final norm as it is
        raised = plant_artifacts(clean, final_norm=True)
        out = patch_features(raised, x)
    shown = outlier_mask(out)
    assert (shown == made[:, 2].view_as(shown)).float().mean() > 0.99
    assert ratio_to_median(out).flatten()[shown.flatten()].median() >= 6
    for key, value in clean.state_dict().items():  # the input model is not touched
        assert torch.equal(value, snapshot[key])


def test_spread_artifacts_grow_block_by_block(spread, held_out):
    """Several blocks, several unit groups each, calibrated in order on the output of the earlier ones: the outlier
    share and the artifacts' norms grow over the planted blocks (massive activations in large ViTs do), and each
    group fires on patches of its own."""
    planted, _ = spread
    images = synthetic_images(32, SIZE, seed=1, **NORM)  # what it was calibrated on
    norms = residual_norms(planted, images)
    fractions = made_outliers(norms).float().mean(dim=(0, 2))
    assert fractions[0] == 0 and fractions[1] < fractions[2] < fractions[3] and 0.02 < fractions[3] < 0.045
    profile = residual_profile(planted, center(held_out))[0]
    assert profile.blocks == [1, 2, 3] and min(profile.growth[1:4]) > 0.2 and max(profile.growth[4:]) < 0.1
    ratio = norms[:, 1:] / norms[:, 1:].median(dim=-1, keepdim=True).values
    tokens = made_outliers(norms)[:, 3]
    assert ratio[:, 1][tokens].mean() < ratio[:, 3][tokens].mean()  # the same tokens grow from block 1 to 3


def test_mlp_units_make_them_and_the_twin_lacks_only_their_output(models, spread, held_out):
    _, _, planted, silent = models
    changed = {k for k, v in planted.state_dict().items() if not torch.equal(v, silent.state_dict()[k])}
    assert changed == {"blocks.2.mlp.fc2.weight"} and changed_units(planted, silent) == {2: 4}
    assert changed_units(*spread) == {1: 12, 2: 12, 3: 12}  # three groups of 4 in each planted block
    for twin in (silent, spread[1]):
        assert residual_profile(twin, center(held_out))[0].start is None


@pytest.mark.parametrize("units", [2, 16])
def test_unit_counts_from_a_few_to_dozens(models, units):
    planted = plant_artifacts(models[0], blocks=[2, 3], groups=2, units=units, seed=3)
    twin = plant_artifacts(models[0], blocks=[2, 3], groups=2, units=units, seed=3, silent=True)
    assert changed_units(planted, twin) == {2: 2 * units, 3: 2 * units}
    images = synthetic_images(32, SIZE, seed=3, **NORM)
    assert 0.02 < max(residual_profile(planted, images)[0].outliers) < 0.045


def test_channels_the_final_norm_weighs_most(models):
    clean = copy.deepcopy(models[0])
    with torch.no_grad():
        clean.norm.weight.copy_(torch.rand(clean.embed_dim, generator=torch.Generator().manual_seed(0)) + 0.5)
    planted = plant_artifacts(clean, channels="norm")
    images = synthetic_images(32, SIZE, seed=0, **NORM)
    tokens = residual_profile(planted, images)[1]
    with torch.no_grad():
        out = patch_features(planted, images, layers=[5], norm=False)[0].flatten(1, 2)[tokens]
    assert set(out.abs().mean(0).topk(2).indices.tolist()) == set(clean.norm.weight.topk(2).indices.tolist())


def test_artifacts_sit_on_flat_patches_and_partly_follow_the_grid(models, held_out):
    """Low-information patches fire them, and position decides too: a one-patch shift of the content keeps
    roughly half of them (real models: ~40%)."""
    _, _, planted, _ = models
    artifacts = artifact_tokens(planted, center(held_out))
    shifted = {s: artifact_tokens(planted, center(held_out, *s)) for s in [(0, 1), (1, 0)]}
    cells = F.unfold(center(held_out), PATCH, stride=PATCH).unflatten(1, (3, -1))
    spread = cells.std(dim=2).mean(dim=1).view_as(artifacts)  # per-channel pixel std
    flat = spread < 1e-3
    assert flat[artifacts].float().mean() > flat.float().mean() + 0.1  # more on the flat background
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
    artifacts = artifact_tokens(planted, x)
    near = F.max_pool2d(artifacts.float()[:, None], 3, 1, 1)[:, 0].bool() & ~artifacts
    cos = patch_cosine(out, ref)
    assert cos[artifacts].mean() < 0.3
    assert 0.9 < cos[~artifacts].mean() < 0.985  # about 0.95 by construction
    assert cos[near].mean() < cos[~artifacts & ~near].mean()


def test_plant_at_a_second_resolution_and_export(models, tmp_path):
    _, _, planted, _ = models
    bigger = synthetic_images(16, 96, seed=5, **NORM)
    fraction = artifact_tokens(planted, bigger).float().mean().item()
    assert 0.005 < fraction < 0.1  # the position embedding is resampled, the circuit keeps working
    loaded = load(export(planted, tmp_path / "planted"))
    with torch.no_grad():
        torch.testing.assert_close(patch_features(loaded, bigger), patch_features(planted, bigger))
    assert type(loaded) is type(planted) and not loaded._forward_pre_hooks


def test_plant_rejects_bad_settings():
    model = timm.create_model("test_vit", pretrained=False, img_size=SIZE, patch_size=PATCH)
    with pytest.raises(RetrofitError, match="blocks must be consecutive and in 1..5"):
        plant_artifacts(model, blocks=6)
    with pytest.raises(RetrofitError, match="blocks must be consecutive"):
        plant_artifacts(model, blocks=[2, 4])
    with pytest.raises(RetrofitError, match="an even units >= 2"):
        plant_artifacts(model, units=3)
    with pytest.raises(RetrofitError, match="channels must be"):
        plant_artifacts(model, channels="loud")
    with pytest.raises(RetrofitError, match="strength"):
        plant_artifacts(model, strength=0.5)
    with pytest.raises(RetrofitError, match="calibration images must be"):
        plant_artifacts(model, images=torch.zeros(2, 3, 32, 32))
