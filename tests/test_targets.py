"""DenoisedTargets: re-alignment, fill masking, outlier-aware averaging, reproducibility."""

import copy
import warnings
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

from retrofit import RetrofitError, patch_features
from retrofit.metrics import outlier_mask
from retrofit.neurons import find_register_neurons
from retrofit.synthetic import plant_artifacts, synthetic_images
from retrofit.targets import (
    DenoisedTargets,
    TargetSettings,
    Views,
    crop_center,
    farthest_point_offsets,
    native_bf16,
)

from .helpers import perturb_

# The algorithm by definition: float32 teacher, every view, no second pass with outliers hidden.
EXACT = TargetSettings(bf16=False, min_clean_views=0, mask_outliers=False)
PLAIN = replace(EXACT, keep_clean_tokens=False, drop_outlier_views=False)
ARTIFACTS = [(2, 3), (5, 5), (6, 1), (0, 7)]  # grid positions of the planted artifacts


def teacher(local: bool = False, symmetric: bool = False) -> torch.nn.Module:
    """test_vit on an 8x8 grid without position embedding; ``local``: no attention, so a patch's feature
    depends on its pixels only; ``symmetric``: mirror-symmetric patch embedding, so mirrored patches match."""
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=128, depth=3)).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
        if local:
            for block in model.blocks:
                block.attn.proj.weight.zero_()
                block.attn.proj.bias.zero_()
        if symmetric:
            w = model.patch_embed.proj.weight
            w.copy_((w + w.flip(-1)) / 2)
    return model


def smooth_images(n: int, size: int) -> torch.Tensor:
    x = F.interpolate(torch.randn(n, 3, size // 12, size // 12), size=size, mode="bilinear")
    return x / x.std()


def outlier_fraction(grid: torch.Tensor) -> float:
    norms = grid.norm(dim=-1).flatten(1)
    return (norms > 3 * norms.median(dim=1, keepdim=True).values).float().mean().item()


def expected_coverage(views: Views, h: int, w: int) -> torch.Tensor:
    cover = torch.zeros(h, w, dtype=torch.int32)
    for dy, dx in views.offsets.tolist():
        cover[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] += 1
    return cover


@pytest.mark.parametrize("margin", [0, 1])
def test_equivariant_teacher_gets_its_own_features_and_coverage(margin):
    model = teacher(local=True, symmetric=True)
    targets = DenoisedTargets(model, PLAIN, layers=[2], seed=3)
    x = torch.randn(3, 3, 128 + 32 * margin, 128 + 32 * margin)
    views = targets.draw_views(3, (8, 8))
    assert views.flips[1:].any() and views.offsets[1:].abs().max() == 1
    out = targets(x, margin, views)
    center = crop_center(x, 16 * margin)
    assert torch.allclose(out.features, patch_features(model, center), atol=1e-5)
    assert torch.allclose(out.layers[2], patch_features(model, center, layers=[2])[0], atol=1e-5)
    assert torch.equal(out.coverage, expected_coverage(views, 8, 8).expand(3, 8, 8))
    assert out.coverage.max() == 10 and out.coverage.min() == 4


def test_fill_is_hidden_from_attention():
    # Global attention and no position embedding: a view's real tokens, with the fill masked out,
    # must equal the teacher's features of the real sub-image alone, mirrored views included.
    model = teacher(symmetric=True)
    x = torch.randn(2, 3, 128, 128)
    views = Views(torch.tensor([[0, 0], [1, -2]]), torch.tensor([[False, False], [True, False]]))
    out = DenoisedTargets(model, PLAIN)(x, margin=0, views=views)
    own = patch_features(model, x)
    assert torch.equal(out.coverage[0, 1:, :6], torch.full((7, 6), 2, dtype=torch.int32))
    assert out.coverage.sum() == 2 * (64 + 42)
    view = (2 * out.features - own)[:, 1:, :6]
    sub = patch_features(model, x[..., 16:, :96])
    assert torch.allclose(view, sub, atol=1e-4)
    filled = patch_features(model, F.pad(x[..., 16:, :96], (32, 0, 0, 16)))[:, :7, 2:]
    assert (filled - sub).abs().max() > 1e-2  # without the mask the fill would have changed them


def planted_teachers() -> tuple[torch.nn.Module, torch.nn.Module]:
    """An artifact-free teacher and a copy with high-norm artifacts tied to ARTIFACTS grid positions."""
    clean = perturb_(timm.create_model("test_vit", pretrained=False, img_size=128, depth=3)).eval()
    with torch.no_grad():
        clean.norm.weight[0] = 8.0  # the final norm lets a token dominated by dim 0 stand out
    planted = copy.deepcopy(clean)
    with torch.no_grad():
        for r, c in ARTIFACTS:
            planted.pos_embed[0, 1 + 8 * r + c, 0] += 50.0
    return clean, planted


def test_planted_artifacts_are_removed_and_clean_tokens_kept():
    clean, planted = planted_teachers()
    x = smooth_images(4, 160)
    center = crop_center(x, 16)
    reference, own = patch_features(clean, center), patch_features(planted, center)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[tuple(zip(*ARTIFACTS, strict=True))] = True
    assert outlier_fraction(own) == pytest.approx(len(ARTIFACTS) / 64)

    def quality(settings: TargetSettings) -> tuple[float, float, torch.Tensor]:
        out = DenoisedTargets(planted, settings)(x, margin=1)
        cos = F.cosine_similarity(out.features, reference, dim=-1)
        assert torch.equal(out.outliers, mask.expand(4, 8, 8))
        return cos.mean().item(), cos[:, mask].mean().item(), out

    plain_all, plain_art, _ = quality(PLAIN)
    all_cos, art_cos, out = quality(EXACT)
    assert outlier_fraction(out.features) == 0
    assert torch.allclose(out.features[:, ~mask], own[:, ~mask], atol=1e-6, rtol=0)
    assert torch.equal(out.coverage[:, ~mask], torch.ones(4, 60, dtype=torch.int32))
    assert (out.coverage[:, mask] >= 3).all()
    assert all_cos > 0.98 and art_cos > 0.75
    assert plain_art < 0.6 and plain_all < 0.8  # what the switches are for


def test_clean_teacher_is_returned_exactly_with_one_forward():
    clean, _ = planted_teachers()
    x = smooth_images(3, 128)
    seen = []
    hook = clean.patch_embed.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    out = DenoisedTargets(clean, replace(TargetSettings(), bf16=False))(x)
    hook.remove()
    assert seen == [3]
    assert torch.equal(out.features, patch_features(clean, x))
    assert not out.outliers.any() and (out.coverage == 1).all()
    # targets are ordinary tensors: a student can train on them
    student = torch.zeros_like(out.features, requires_grad=True)
    (1 - F.cosine_similarity(student + 1, out.features, dim=-1)).mean().backward()
    assert student.grad.abs().sum() > 0


def test_adaptive_views_stop_once_outliers_are_covered():
    clean, planted = planted_teachers()
    x = smooth_images(4, 160)
    reference = patch_features(clean, crop_center(x, 16))
    seen = []
    hook = planted.patch_embed.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    out = DenoisedTargets(planted, replace(EXACT, min_clean_views=1), layers=[1])(x, margin=1)
    hook.remove()
    assert seen == [4, 4, 4, 4]  # the image, then views 1-3: view 3 is the first to show the corner artifact
    mask = out.outliers[0]
    assert (out.coverage[:, mask] >= 1).all() and outlier_fraction(out.features) == 0
    cos = F.cosine_similarity(out.features, reference, dim=-1)
    assert cos.mean() > 0.98 and cos[:, mask].mean() > 0.75


def test_bf16_teacher_gives_float32_targets_close_to_fp32():
    _, planted = planted_teachers()
    x = smooth_images(2, 160)
    fp32 = DenoisedTargets(planted, EXACT, seed=2)(x, 1)
    bf16 = DenoisedTargets(planted, replace(EXACT, bf16=True), seed=2)(x, 1)
    assert bf16.features.dtype == torch.float32
    assert torch.equal(bf16.outliers, fp32.outliers)
    assert F.cosine_similarity(bf16.features, fp32.features, dim=-1).min() > 0.99


def test_same_seed_is_bit_identical_and_state_resumes():
    model, few = teacher(), replace(PLAIN, num_views=4)
    x = torch.randn(2, 3, 160, 160)
    a, b = DenoisedTargets(model, few, seed=7), DenoisedTargets(model, few, seed=7)
    assert torch.equal(a(x, 1).features, b(x, 1).features)
    state = a.get_rng_state()
    resumed = DenoisedTargets(model, few, seed=99)
    resumed.set_rng_state(state)
    assert torch.equal(a(x, 1).features, resumed(x, 1).features)
    other = DenoisedTargets(model, few, seed=8)
    assert not torch.equal(other(x, 1).features, b(x, 1).features)
    offsets = [DenoisedTargets(model, seed=s).draw_views(2, (37, 37)).offsets for s in (1, 2)]
    assert not torch.equal(*offsets)


def test_chunking_matches_one_batch():
    _, planted = planted_teachers()
    x = smooth_images(2, 160)
    small = DenoisedTargets(planted, TargetSettings(chunk_size=4), layers=[-2], seed=1)(x, 1)
    big = DenoisedTargets(planted, TargetSettings(chunk_size=64), layers=[-2], seed=1)(x, 1)
    assert torch.allclose(small.features, big.features, atol=1e-5)
    assert torch.allclose(small.layers[1], big.layers[1], atol=1e-5)
    assert torch.equal(small.coverage, big.coverage)


def test_farthest_point_offsets_spread_within_range():
    offsets = farthest_point_offsets(10, 5, 3, 100, torch.Generator().manual_seed(0))
    assert offsets[0].tolist() == [0, 0]
    assert offsets[:, 0].abs().max() == 5 and offsets[:, 1].abs().max() == 3
    distances = torch.cdist(offsets.float(), offsets.float()) + torch.eye(10) * 100
    assert distances.min() >= 2  # ten random candidates would often coincide or touch
    targets = DenoisedTargets(teacher())
    assert [targets.margin_patches(g) for g in (4, 8, 37)] == [0, 1, 5]
    views = targets.draw_views(5, (37, 20))
    assert views.offsets[:, 0].abs().max() <= 5 and views.offsets[:, 1].abs().max() <= 3
    assert not views.flips[0].any()


def test_settings_key_tracks_what_changes_targets():
    base = TargetSettings()
    assert base.key() == TargetSettings().key()
    assert base.key() == TargetSettings(chunk_size=4).key()
    assert base.key() != TargetSettings(outlier_k=4).key() != TargetSettings(keep_clean_tokens=False).key()
    assert len({base.key(), TargetSettings(min_clean_views=0).key(), TargetSettings(bf16=False).key(),
                TargetSettings(mask_outliers=False).key()}) == 4


NO_FLIPS = torch.zeros(2, 3, dtype=torch.bool)


@pytest.mark.parametrize("make", [
    lambda m: TargetSettings(num_views=0),
    lambda m: TargetSettings(max_shift=0.6),
    lambda m: TargetSettings(outlier_k=1.0),
    lambda m: TargetSettings(min_clean_views=-1),
    lambda m: DenoisedTargets(m, layers=[3]),
    lambda m: DenoisedTargets(m)(torch.randn(1, 3, 100, 100)),
    lambda m: DenoisedTargets(m)(torch.randn(1, 3, 64, 64), margin=2),
    lambda m: DenoisedTargets(m)(torch.randn(1, 3, 64, 64), views=Views(torch.ones(2, 2).long(), NO_FLIPS[:, :1])),
    lambda m: DenoisedTargets(m)(torch.randn(1, 3, 64, 64), views=Views(torch.zeros(2, 2).long(), NO_FLIPS)),
])
def test_bad_input_is_one_line_error(make):
    with pytest.raises(RetrofitError) as err:
        make(timm.create_model("test_vit", pretrained=False, img_size=64, depth=3))
    assert "\n" not in str(err.value)


def test_realistic_artifacts_hidden_from_attention_or_moved_to_test_time_registers():
    """Masking the teacher's outliers frees the other tokens' targets from what the artifacts wrote into them;
    with register neurons the teacher's artifacts never form, and one forward per image is all it takes."""
    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8).eval()
    shown = dict(final_norm=True)  # the views and the masking work on the outliers the final features show
    planted, twin = plant_artifacts(base, **shown), plant_artifacts(base, **shown, silent=True)
    x = synthetic_images(16, 80, seed=4, mean=(0.5,) * 3, std=(0.5,) * 3)
    center = crop_center(x, 8)
    with torch.no_grad():
        truth, artifacts = patch_features(twin, center), outlier_mask(patch_features(planted, center))
    forwards: list[int] = []
    planted.patch_embed.register_forward_hook(lambda m, i, o: forwards.append(len(i[0])))

    def cosine(settings: TargetSettings, **kwargs) -> tuple[float, float]:
        forwards.clear()
        cos = F.cosine_similarity(DenoisedTargets(planted, settings, seed=1, **kwargs)(x, 1).features, truth, dim=-1)
        return cos[~artifacts].mean().item(), cos[artifacts].mean().item()

    assert artifacts.float().mean() > 0.01
    adaptive = replace(EXACT, min_clean_views=2)
    plain, masked = cosine(adaptive), cosine(replace(adaptive, mask_outliers=True))
    assert masked[0] > plain[0] + 0.01 and masked[1] > 0.8
    moved = cosine(replace(adaptive, mask_outliers=True), neurons=find_register_neurons(planted, center))
    assert moved[0] > 0.99 and moved[1] > 0.95 and forwards == [16]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_chosen_only_where_it_is_native_and_forcing_it_elsewhere_warns(native, monkeypatch):
    """bf16 autocast is emulated (about 7x slower) on CPUs without AVX512-BF16/AMX: the default never picks it
    there, an explicit setting wins, and forcing it on such a CPU says so."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native, "amx_bf16": False})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16(torch.device("cpu")) is native and native_bf16(torch.device("cuda"))
    dtypes = []
    model = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    model.blocks[0].attn.qkv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))  # a matmul
    images = torch.randn(2, 3, 32, 32)
    for bf16, expected in ((None, native), (False, False), (True, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DenoisedTargets(model, TargetSettings(bf16=bf16))(images)
        assert (dtypes[-1] == torch.bfloat16) is expected, (bf16, dtypes[-1])
        assert any("without native bf16" in str(w.message) for w in caught) is (bf16 is True and not native)
