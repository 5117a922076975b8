"""Artifact metrics over patch grids (B, H, W, D), as :func:`retrofit.features.patch_features` returns them.

Every state is a sum or a concatenation, which torchmetrics reduces across DDP ranks, so each value
is exact over everything seen on all ranks (no streaming approximation). The concatenated states
(norms, cosines) cost one float per patch token (per layer): fine for probe batches and diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .errors import RetrofitError

Grids = Tensor | Sequence[Tensor] | Mapping[Any, Tensor]


def check_grid(grid: Tensor) -> None:
    """A patch grid is (B, H, W, D); anything else is a caller mistake worth one clear line."""
    if not isinstance(grid, Tensor) or grid.ndim != 4:
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise RetrofitError(
            f"expected a patch grid of shape (B, H, W, D) as patch_features returns, got {shape}."
        )


def token_norms(grid: Tensor) -> Tensor:
    """L2 norm of every patch token, (B, H, W), in float32 so half-precision features do not overflow."""
    check_grid(grid)
    return grid.float().norm(dim=-1)


def quantile(values: Tensor, q: float, dim: int = -1) -> Tensor:
    """Linear-interpolation quantile along ``dim`` (as ``torch.quantile``, without its 16M-element limit)."""
    ordered = values.sort(dim=dim).values
    pos = q * (ordered.shape[dim] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, ordered.shape[dim] - 1)
    return torch.lerp(ordered.select(dim, lo), ordered.select(dim, hi), pos - lo)


def outlier_cuts(
    norms: Tensor, k: float = 3.0, threshold: float | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row norm cuts (..., 1) for token norms (..., N), each row one image: (high, low).

    A token above ``high`` (k x the row median, or ``threshold`` when given) or below ``low``
    (median / k) is an outlier. The median is over the ``valid`` tokens (all when None).
    """
    if k <= 1:
        raise RetrofitError(f"outlier factor k must be > 1 (a token k times the median norm), got {k}.")
    ref = norms if valid is None else norms.masked_fill(~valid, float("nan"))
    median = ref.nanmedian(dim=-1, keepdim=True).values
    high = k * median if threshold is None else torch.full_like(median, threshold)
    return high, median / k


def outlier_masks(
    norms: Tensor, k: float = 3.0, threshold: float | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(high-norm, low-norm) outlier flags for token norms (..., N) by :func:`outlier_cuts`, one median per row."""
    high, low = outlier_cuts(norms, k, threshold, valid)
    return norms > high, norms < low


def outlier_mask(grid: Tensor, k: float = 3.0, threshold: float | None = None, low: bool = False) -> Tensor:
    """Which patch tokens are artifacts, (B, H, W) bool: the project's one definition of an outlier.

    High-norm (default): norm > ``k`` x the median norm of the same image, or norm > ``threshold``
    when one is given (an absolute cut like the registers paper's 150). ``low=True``: norm < median / k,
    the low-norm artifacts of CLIP-style models (``threshold`` does not apply to those).
    """
    norms = token_norms(grid)
    return outlier_masks(norms.flatten(1), k, threshold)[int(low)].view_as(norms)


def patch_cosine(features: Tensor, reference: Tensor) -> Tensor:
    """Cosine of each patch token to the token at the same position in ``reference``, (B, H, W)."""
    check_grid(features)
    if features.shape != reference.shape:
        raise RetrofitError(
            f"features {tuple(features.shape)} and reference {tuple(reference.shape)} differ in shape: "
            "compute both at the same image size."
        )
    return F.cosine_similarity(features.float(), reference.float(), dim=-1)


def layer_label(layer: int | str) -> str:
    """Name of a layer in metric keys and reports: block indices read as ``layer5``."""
    return f"layer{layer}" if isinstance(layer, int) else str(layer)


class _LayeredMetric(Metric):
    """A metric over one grid, or over one grid per layer when built with ``layers``.

    With ``layers`` the update takes a list (in that order) or a dict keyed by the same layers, and
    ``compute`` keys every value ``"<layer>/<stat>"`` (``layer5/p99``) so it logs as is.
    """

    full_state_update = False

    def __init__(self, layers: Sequence[int | str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if layers is not None and not len(layers):
            raise RetrofitError("layers is empty: pass None for a single grid or at least one layer.")
        self.labels = None if layers is None else [layer_label(x) for x in layers]

    @property
    def num_layers(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def _grids(self, grids: Grids) -> list[Tensor]:
        if self.labels is None:
            if not isinstance(grids, Tensor):
                raise RetrofitError(
                    f"{type(self).__name__} was built for one grid: pass a tensor, or build it with layers=[...]."
                )
            out = [grids]
        elif isinstance(grids, Mapping):
            by_label = {layer_label(key): grid for key, grid in grids.items()}
            if sorted(by_label) != sorted(self.labels):
                raise RetrofitError(f"got layers {sorted(by_label)} but the metric was built for {self.labels}.")
            out = [by_label[label] for label in self.labels]
        elif isinstance(grids, Sequence) and len(grids) == len(self.labels):
            out = list(grids)
        else:
            count = 1 if isinstance(grids, Tensor) else len(grids)
            raise RetrofitError(f"got {count} grids but the metric was built for layers {self.labels}.")
        for grid in out:
            check_grid(grid)
        return out

    def _keyed(self, stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{stat: (L,) values}`` -> flat dict, one key per stat (and layer)."""
        if self.labels is None:
            return {name: values[0] for name, values in stats.items()}
        return {f"{label}/{name}": values[i] for i, label in enumerate(self.labels) for name, values in stats.items()}


class PatchNormStats(_LayeredMetric):
    """Median, 99th percentile and maximum of patch-token L2 norms over all tokens seen (per layer)."""

    def __init__(self, layers: Sequence[int | str] | None = None, **kwargs: Any) -> None:
        super().__init__(layers, **kwargs)
        self.add_state("norms", default=[], dist_reduce_fx="cat")

    def update(self, grids: Grids) -> None:
        norms = [token_norms(grid).flatten() for grid in self._grids(grids)]
        if len({n.numel() for n in norms}) > 1:
            raise RetrofitError("the layer grids hold different numbers of tokens: pass grids of the same images.")
        self.norms.append(torch.stack(norms, dim=1))

    def compute(self) -> dict[str, Tensor]:
        norms = dim_zero_cat(self.norms)  # (tokens, layers)
        return self._keyed({
            "median": quantile(norms, 0.5, dim=0),
            "p99": quantile(norms, 0.99, dim=0),
            "max": norms.max(dim=0).values,
        })


class OutlierFraction(_LayeredMetric):
    """Fraction of patch tokens that are high-norm and low-norm outliers (see :func:`outlier_mask`)."""

    def __init__(
        self, k: float = 3.0, threshold: float | None = None, layers: Sequence[int | str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers, **kwargs)
        self.k, self.threshold = k, threshold
        self.add_state("high", default=torch.zeros(self.num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("low", default=torch.zeros(self.num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, grids: Grids) -> None:
        grids = self._grids(grids)
        for i, grid in enumerate(grids):
            high, low = outlier_masks(token_norms(grid).flatten(1), self.k, self.threshold)
            self.high[i] += high.sum()
            self.low[i] += low.sum()
        self.tokens += grids[0].shape[:3].numel()

    def compute(self) -> dict[str, Tensor]:
        return self._keyed({"high": self.high / self.tokens, "low": self.low / self.tokens})


class FeatureFidelity(Metric):
    """Mean and a low percentile of the patch cosine to reference features (1 = unchanged).

    The low percentile (``low_q=0.05`` -> key ``p5``) shows the worst tokens, where a mean hides them.
    """

    full_state_update = False

    def __init__(self, low_q: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= low_q <= 1:
            raise RetrofitError(f"low_q is a quantile in [0, 1], got {low_q}: e.g. 0.05 for the 5th percentile.")
        self.low_q = low_q
        self.add_state("cosines", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, reference: Tensor) -> None:
        self.cosines.append(patch_cosine(features, reference).flatten())

    def compute(self) -> dict[str, Tensor]:
        cosines = dim_zero_cat(self.cosines)
        return {"mean": cosines.mean(), f"p{100 * self.low_q:g}": quantile(cosines, self.low_q)}


class PositionLeakage(Metric):
    """Held-out R^2 of a ridge probe that predicts each patch's row and column from its features.

    High R^2 means the features carry position-tied signal (position-embedding artifacts); artifact
    tokens themselves predict their position badly. Every ``holdout_every``-th image (the 2nd, then
    every ``holdout_every`` after) is held out; the probe is fitted in closed form on second moments
    of ``[features, 1, row, col]`` accumulated per split, so states are sums and DDP-exact. The ridge
    penalty is ``alpha`` x the mean feature variance. R^2 is averaged over row and column and
    clamped at 0: a probe worse than always guessing the mean position found no position at all
    (with fewer fitted tokens than feature channels expect that, however leaky the features).
    """

    full_state_update = False

    def __init__(self, alpha: float = 0.1, holdout_every: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if holdout_every < 2:
            raise RetrofitError(f"holdout_every must be >= 2 (one image in N held out), got {holdout_every}.")
        self.alpha, self.holdout_every = alpha, holdout_every
        # (1, D + 3, D + 3) moment matrices; a list because D is only known at the first update.
        self.add_state("fit_moments", default=[], dist_reduce_fx="cat")
        self.add_state("test_moments", default=[], dist_reduce_fx="cat")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _moments(grid: Tensor) -> Tensor:
        b, h, w, _ = grid.shape
        rows, cols = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        pos = torch.stack([rows, cols], dim=-1).to(grid.device, torch.float64).expand(b, h, w, 2)
        ones = torch.ones(b, h, w, 1, dtype=torch.float64, device=grid.device)
        z = torch.cat([grid.double(), ones, pos], dim=-1).flatten(0, 2)
        return (z.T @ z)[None]

    @staticmethod
    def _accumulate(state: list[Tensor], moments: Tensor) -> list[Tensor]:
        """Keep one running sum per rank instead of one matrix per update."""
        return [dim_zero_cat(state + [moments]).sum(0, keepdim=True)]

    def update(self, grid: Tensor) -> None:
        check_grid(grid)
        if min(grid.shape[1:3]) < 2:
            raise RetrofitError(f"position leakage needs grids of at least 2x2 patches, got {tuple(grid.shape[1:3])}.")
        index = self.images + torch.arange(grid.shape[0], device=grid.device)
        held = index % self.holdout_every == 1
        if (~held).any():
            self.fit_moments = self._accumulate(self.fit_moments, self._moments(grid[~held]))
        if held.any():
            self.test_moments = self._accumulate(self.test_moments, self._moments(grid[held]))
        self.images += grid.shape[0]

    def compute(self) -> Tensor:
        if not len(self.fit_moments) or not len(self.test_moments):
            raise RetrofitError("position leakage needs at least 2 images (one to fit the probe, one held out).")
        fit, test = dim_zero_cat(self.fit_moments).sum(0), dim_zero_cat(self.test_moments).sum(0)
        d = fit.shape[0] - 3
        n = fit[d, d]
        mean_x, mean_y = fit[:d, d] / n, fit[d, d + 1:] / n
        cov_xx = fit[:d, :d] / n - torch.outer(mean_x, mean_x)
        cov_xy = fit[:d, d + 1:] / n - torch.outer(mean_x, mean_y)
        ridge = self.alpha * cov_xx.diagonal().mean().clamp_min(1e-12)
        weights = torch.linalg.solve(cov_xx + ridge * torch.eye(d, dtype=fit.dtype, device=fit.device), cov_xy)
        coef = torch.cat([weights, (mean_y - mean_x @ weights)[None]])  # (D + 1, 2), bias last
        xx, xy, yy = test[:d + 1, :d + 1], test[:d + 1, d + 1:], test[d + 1:, d + 1:].diagonal()
        sse = yy - 2 * (coef * xy).sum(0) + (coef * (xx @ coef)).sum(0)
        sst = yy - test[d, d + 1:] ** 2 / test[d, d]
        return (1 - sse / sst).mean().clamp_min(0).float()


def neighbours(mask: Tensor) -> Tensor:
    """(B, H, W) bool: the 8-neighbourhood of ``mask``'s tokens, without those tokens."""
    grown = F.max_pool2d(mask.float()[:, None], kernel_size=3, stride=1, padding=1)[:, 0].bool()
    return grown & ~mask


REPAIR_KEYS = ("all", "p5", "artifacts", "neighbours", "elsewhere")
"""The keys of :func:`repair_scores`, in the order reports show them."""


def repair_scores(features: Tensor, reference: Tensor, artifacts: Tensor) -> dict[str, float]:
    """Patch cosine to artifact-free reference features, over all tokens and where the artifacts did their harm.

    ``artifacts`` (B, H, W) marks the artifact positions of the model before repair. Keys: ``all``, ``p5`` (5th
    percentile), ``artifacts``, ``neighbours`` (their 8 neighbours: what attention spread the harm to) and
    ``elsewhere``; NaN for an empty set.
    """
    cos = patch_cosine(features, reference)
    near = neighbours(artifacts)
    rest = ~artifacts & ~near

    def mean(mask: Tensor) -> float:
        return cos[mask].mean().item() if mask.any() else float("nan")

    return {"all": cos.mean().item(), "p5": quantile(cos.flatten(), 0.05).item(), "artifacts": mean(artifacts),
            "neighbours": mean(near), "elsewhere": mean(rest)}
