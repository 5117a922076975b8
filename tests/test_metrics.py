"""Artifact metrics on hand-made grids whose answers are known exactly."""

import pytest
import torch

from retrofit import RetrofitError
from retrofit.metrics import (
    FeatureFidelity,
    OutlierFraction,
    PatchNormStats,
    PositionLeakage,
    outlier_mask,
    quantile,
)


def grid_with_norms(norms: torch.Tensor, dim: int = 8) -> torch.Tensor:
    """A (B, H, W, dim) grid whose token norms are exactly ``norms``, in varying directions."""
    directions = torch.nn.functional.normalize(torch.randn(*norms.shape, dim), dim=-1)
    return directions * norms[..., None]


def test_outlier_mask_high_low_and_absolute_threshold():
    norms = torch.full((2, 4, 4), 10.0)
    norms[0, 1, 2] = 31.0  # > 3 x median 10
    norms[0, 3, 3] = 29.0  # not an outlier at k = 3
    norms[1, 0, 0] = 3.0  # < median / 3
    grid = grid_with_norms(norms)
    high = outlier_mask(grid)
    assert high.shape == (2, 4, 4) and high.sum() == 1 and high[0, 1, 2]
    low = outlier_mask(grid, low=True)
    assert low.sum() == 1 and low[1, 0, 0]
    assert outlier_mask(grid, k=2.5).sum() == 2
    assert outlier_mask(grid, threshold=30.0).sum() == 1
    assert outlier_mask(grid, threshold=5.0).sum() == 31  # absolute: every token but the 3.0 one


def test_norm_stats_are_exact_over_updates_and_layers():
    values = torch.arange(1, 33, dtype=torch.float32)
    a, b = grid_with_norms(values[:16].reshape(1, 4, 4)), grid_with_norms(values[16:].reshape(1, 4, 4))
    metric = PatchNormStats()
    metric.update(a)
    metric.update(b)
    stats = metric.compute()
    assert stats["median"].item() == pytest.approx(16.5, abs=1e-4)
    assert stats["p99"].item() == pytest.approx(torch.quantile(values, 0.99).item(), abs=1e-4)
    assert stats["max"].item() == pytest.approx(32.0, abs=1e-4)

    per_layer = PatchNormStats(layers=[2, "final"])
    per_layer.update({2: a, "final": 2 * a})
    out = per_layer.compute()
    assert set(out) == {f"{layer}/{s}" for layer in ("layer2", "final") for s in ("median", "p99", "max")}
    assert out["final/max"].item() == pytest.approx(32.0, abs=1e-4)
    assert out["layer2/median"].item() == pytest.approx(8.5, abs=1e-4)


def test_outlier_fraction_counts_and_merges_like_ddp():
    norms = torch.ones(2, 4, 4)
    norms[0, 0, :3] = 5.0  # 3 high-norm tokens in image 0
    norms[1, 2, 2] = 0.1  # 1 low-norm token in image 1
    grid = grid_with_norms(norms)
    whole = OutlierFraction()
    whole.update(grid)
    first, second = OutlierFraction(), OutlierFraction()
    first.update(grid[:1])
    second.update(grid[1:])
    first.merge_state(second)  # what the DDP reduction does with the states of two ranks
    for metric in (whole, first):
        out = metric.compute()
        assert out["high"].item() == pytest.approx(3 / 32)
        assert out["low"].item() == pytest.approx(1 / 32)
    layered = OutlierFraction(layers=[0, 1])
    layered.update([grid, grid_with_norms(torch.ones(2, 4, 4))])
    assert layered.compute()["layer0/high"].item() == pytest.approx(3 / 32)
    assert layered.compute()["layer1/high"].item() == 0


def test_fidelity_identical_and_orthogonal_halves():
    features = torch.randn(2, 4, 4, 16)
    metric = FeatureFidelity()
    metric.update(features, features.clone())
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(1.0, abs=1e-6) and out["p5"].item() == pytest.approx(1.0, abs=1e-6)

    reference = torch.zeros(1, 2, 10, 4)
    reference[..., 0] = 1.0
    rotated = reference.clone()
    rotated[:, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # second row orthogonal: cosine 0
    metric = FeatureFidelity(low_q=0.01)
    metric.update(rotated, reference)
    out = metric.compute()
    assert out["mean"].item() == pytest.approx(0.5) and out["p1"].item() == pytest.approx(0.0)


def test_position_leakage_one_hot_vs_random():
    h = w = 6
    one_hot = torch.eye(h * w).reshape(1, h, w, h * w).expand(8, -1, -1, -1)
    leaky = PositionLeakage()
    leaky.update(one_hot[:3])
    leaky.update(one_hot[3:])
    assert leaky.compute().item() > 0.98

    noise = PositionLeakage()
    noise.update(torch.randn(16, h, w, 8))
    assert 0 <= noise.compute().item() < 0.05

    # a position signal buried in noise is found, and mixing it in raises the score monotonically
    scores = []
    for strength in (0.0, 1.0, 3.0):
        m = PositionLeakage()
        m.update(0.3 * torch.randn(16, h, w, h * w) + strength * one_hot[:1])
        scores.append(m.compute().item())
    assert scores[0] < 0.05 and 0.1 < scores[1] < scores[2] - 0.3


def test_quantile_matches_torch():
    x = torch.randn(5, 37)
    for q in (0.0, 0.05, 0.5, 0.99, 1.0):
        assert torch.allclose(quantile(x, q, dim=1), torch.quantile(x, q, dim=1), atol=1e-6)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(RetrofitError, match=r"shape \(B, H, W, D\).*got \(4, 16\)"):
        PatchNormStats().update(torch.randn(4, 16))
    with pytest.raises(RetrofitError, match="got 1 grids but the metric was built for layers"):
        OutlierFraction(layers=[1, 2]).update([torch.randn(1, 2, 2, 4)])
    with pytest.raises(RetrofitError, match="differ in shape"):
        FeatureFidelity().update(torch.randn(1, 2, 2, 4), torch.randn(1, 3, 2, 4))
    with pytest.raises(RetrofitError, match="k must be > 1"):
        outlier_mask(torch.randn(1, 2, 2, 4), k=0.5)
    metric = PositionLeakage()
    metric.update(torch.randn(1, 3, 3, 4))
    with pytest.raises(RetrofitError, match="at least 2 images"):
        metric.compute()
