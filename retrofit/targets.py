"""Denoised teacher targets: the frozen teacher's patch features, cleaned of its artifacts.

Artifacts tied to grid positions land on different image content in each view shifted by whole
patches, so mapping every view back onto the original grid and averaging per patch removes them
(PH-Reg). A plain average gets several things wrong (docs/method.md); each lesson has a switch in
:class:`TargetSettings` so it can be compared against the plain recipe:

- tokens that are outliers in their own view are left out of the average (artifacts partly move
  with the content, so a plain mean keeps their direction);
- the teacher's own token is kept wherever it is not an outlier (the average blurs small grids,
  and a model without artifacts must get exactly its own features back);
- the teacher's outliers are hidden from its own attention (a second forward), so the other tokens'
  targets do not carry what the artifacts wrote into them;
- views are crop windows moved inside a margin of real pixels; where a view leaves the image the
  strip is filled with 0 (the mean after normalisation) and hidden from the teacher's attention,
  because constant fill makes flat patches, exactly where artifacts form.

With register neurons (:mod:`retrofit.neurons`) the teacher runs with them switched off (or, with
``neurons="move"``, moved onto a test-time register): its artifacts mostly never form, and shifted views are only
drawn for the images where some remain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import RetrofitError
from .features import block_indices, dynamic_input, forward_tokens, grid_size, patch_size
from .metrics import outlier_masks
from .neurons import RegisterNeurons, silenced, test_time_registers
from .surgery import check_supported

# Bump when the way targets are computed changes, so caches made by older code are never read.
ALGORITHM_VERSION = 2
NeuronEdit = Literal["silence", "move"]


@dataclass(frozen=True)
class TargetSettings:
    """How targets are made. Every field except ``chunk_size`` changes the targets and enters :meth:`key`."""

    num_views: int = 10
    """Views per image, the unshifted one included (PH-Reg: 10)."""
    max_shift: float = 0.15
    """Largest shift as a fraction of the grid side, rounded down to whole patches (PH-Reg ablation: 15%)."""
    num_candidates: int = 100
    """Random offsets that farthest-point sampling picks the shifted views from (PH-Reg: 100)."""
    flip_prob: float = 0.5
    """Chance that a shifted view is mirrored left-right; the unshifted view never is."""
    outlier_k: float = 3.0
    """A token whose norm is above k x, or below 1/k x, the median norm of its view is an outlier."""
    drop_outlier_views: bool = True
    """Average a position only over the views in which its token is not an outlier."""
    keep_clean_tokens: bool = True
    """Keep the teacher's own token wherever it is not an outlier; average only at outlier positions."""
    min_clean_views: int = 2
    """Adaptive view count: an image gets no more views once every one of its outlier positions has this
    many clean views (0: all ``num_views``). Clean coverage, not the view count, is what removes artifacts."""
    mask_outliers: bool = True
    """Hide the teacher's outlier tokens from its attention (a second forward), so that the other tokens' targets
    do not carry what the artifacts wrote into them."""
    neurons: NeuronEdit = "silence"
    """What the teacher does with the register neurons it is given: ``silence`` switches them off on every token
    (their artifacts never form, nor what those write into the other tokens: the patch features the model has
    without them); ``move`` gives their activations to a test-time register (Jiang et al.), which keeps the global
    information they carried in that token but lets every patch token read it."""
    bf16: bool | None = None
    """Run the teacher's forwards under bf16 autocast; targets stay float32. None: where bf16 is native (CUDA, or a
    CPU with AVX512-BF16/AMX), never where it would be emulated (about 7x slower)."""
    chunk_size: int = 32
    """Views per teacher forward: bounds memory, does not change the targets."""

    def __post_init__(self) -> None:
        checks = (
            (self.num_views >= 1, f"num_views must be >= 1, got {self.num_views}"),
            (0 <= self.max_shift < 0.5, f"max_shift must be in [0, 0.5), got {self.max_shift}"),
            (self.num_candidates >= 1, f"num_candidates must be >= 1, got {self.num_candidates}"),
            (0 <= self.flip_prob <= 1, f"flip_prob must be in [0, 1], got {self.flip_prob}"),
            (self.outlier_k > 1, f"outlier_k must be > 1, got {self.outlier_k}"),
            (self.min_clean_views >= 0, f"min_clean_views must be >= 0, got {self.min_clean_views}"),
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (self.neurons in ("silence", "move"), f"neurons must be 'silence' or 'move', got {self.neurons!r}"),
        )
        for ok, problem in checks:
            if not ok:
                raise RetrofitError(f"{problem}: fix the TargetSettings value.")

    def key(self) -> str:
        """Stable short hash of everything that changes the targets (for cache directories)."""
        fields = {k: v for k, v in asdict(self).items() if k != "chunk_size"}
        fields["algorithm"] = ALGORITHM_VERSION
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_SETTINGS = TargetSettings()


@dataclass
class Targets:
    """Denoised teacher features for one batch, on the grid the student sees."""

    features: Tensor
    """(B, h, w, D) float32 final-layer target, after the final norm like :func:`patch_features`."""
    layers: dict[int, Tensor]
    """Block index -> (B, h, w, D) target for each requested intermediate layer (final norm applied)."""
    coverage: Tensor
    """(B, h, w) int32: how many views the final-layer target at each patch is made of."""
    outliers: Tensor
    """(B, h, w) bool: the teacher's own final-layer token there is an outlier."""


@dataclass(frozen=True)
class Views:
    """The views of one batch. View ``v`` of image ``b`` is the crop window moved by ``offsets[v]``
    patches (dy, dx), mirrored left-right when ``flips[v, b]``; view 0 is the image itself."""

    offsets: Tensor
    """(V, 2) int64 whole-patch offsets (dy, dx); offsets[0] is (0, 0)."""
    flips: Tensor
    """(V, B) bool; flips[0] is all False."""


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device``: CUDA, or a CPU with AVX512-BF16 or AMX-BF16."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def crop_center(images: Tensor, margin_px: int) -> Tensor:
    """What the student sees: ``images`` without a border of ``margin_px`` pixels on every side."""
    if margin_px < 0 or 2 * margin_px >= min(images.shape[-2:]):
        raise RetrofitError(
            f"margin of {margin_px} px does not fit images of size {tuple(images.shape[-2:])}: "
            "use a margin smaller than half the image side."
        )
    if margin_px == 0:
        return images
    return images[..., margin_px:-margin_px, margin_px:-margin_px]


def _outliers(norms: Tensor, k: float, valid: Tensor | None = None) -> Tensor:
    """High- and low-norm outliers of each row (one view), the median taken over its real tokens."""
    high, low = outlier_masks(norms, k, valid=valid)
    return high | low


def farthest_point_offsets(
    num_views: int, max_dy: int, max_dx: int, num_candidates: int, generator: torch.Generator
) -> Tensor:
    """(num_views, 2) whole-patch offsets: (0, 0) first, then farthest-point picks from random candidates.

    Farthest-point sampling spreads a few views over the whole shift range, so each patch is seen
    from views whose grid-tied artifacts sit on other content (PH-Reg: 10 views of 100 candidates).
    """
    dy = torch.randint(-max_dy, max_dy + 1, (num_candidates,), generator=generator)
    dx = torch.randint(-max_dx, max_dx + 1, (num_candidates,), generator=generator)
    candidates = torch.stack([dy, dx], dim=1)
    offsets = torch.zeros(num_views, 2, dtype=torch.long)
    distance = candidates.pow(2).sum(1)  # squared distance to the nearest chosen offset
    for v in range(1, num_views):
        offsets[v] = candidates[distance.argmax()]
        distance = torch.minimum(distance, (candidates - offsets[v]).pow(2).sum(1))
    return offsets


def _alignment(views: Views, view_idx: Tensor, image_idx: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """For each sample's view, the view token showing each original patch (S, h*w) and whether it is shown."""
    h, w = grid
    offsets, flips = views.offsets[view_idx], views.flips[view_idx, image_idx]
    rows = torch.arange(h) - offsets[:, :1]
    cols = torch.arange(w) - offsets[:, 1:]
    shown = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    cols = torch.where(flips[:, None], w - 1 - cols, cols)
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    return index.flatten(1), shown.flatten(1)


def _real_tokens(views: Views, view_idx: Tensor, image_idx: Tensor, grid: tuple[int, int], margin: int) -> Tensor:
    """(S, h*w) bool: the view token shows real pixels (inside the margin), not fill."""
    h, w = grid
    offsets, flips = views.offsets[view_idx], views.flips[view_idx, image_idx]
    rows = offsets[:, :1] + torch.arange(h)
    cols = offsets[:, 1:] + torch.arange(w)
    real_rows = (rows >= -margin) & (rows < h + margin)
    real_cols = (cols >= -margin) & (cols < w + margin)
    real_cols = torch.where(flips[:, None], real_cols.flip(-1), real_cols)
    return (real_rows[:, :, None] & real_cols[:, None, :]).flatten(1)


class _Average:
    """Per-patch sums over views: over all views showing a patch, and over those where it is no outlier."""

    def __init__(self, batch: int, tokens: int, dim: int, device: torch.device) -> None:
        self.total = torch.zeros(batch, tokens, dim, device=device)
        self.count = torch.zeros(batch, tokens, dtype=torch.int32, device=device)
        self.clean = torch.zeros_like(self.total)
        self.clean_count = torch.zeros_like(self.count)

    def add(self, view_idx: Tensor, image_idx: Tensor, features: Tensor, shown: Tensor, clean: Tensor) -> None:
        # One slice per view: a view holds each image once, so indexed += is exact and deterministic.
        start = 0
        for n in torch.unique_consecutive(view_idx, return_counts=True)[1].tolist():
            s, b = slice(start, start + n), image_idx[start:start + n].to(features.device)
            self.total[b] += features[s] * shown[s, :, None]
            self.count[b] += shown[s]
            self.clean[b] += features[s] * clean[s, :, None]
            self.clean_count[b] += clean[s]
            start += n

    def result(self) -> tuple[Tensor, Tensor]:
        """Mean over clean views where there are any, else over all views showing the patch; and the count."""
        has_clean = self.clean_count > 0
        mean = torch.where(
            has_clean[..., None],
            self.clean / self.clean_count.clamp(min=1)[..., None],
            self.total / self.count.clamp(min=1)[..., None],
        )
        return mean, torch.where(has_clean, self.clean_count, self.count)


def _check_views(views: Views, batch: int, grid: tuple[int, int]) -> None:
    num = len(views.offsets)
    if num == 0 or views.offsets.shape != (num, 2) or views.flips.shape != (num, batch):
        raise RetrofitError(
            f"views need offsets of shape (V, 2) and flips of shape (V, {batch}), got "
            f"{tuple(views.offsets.shape)} and {tuple(views.flips.shape)}: build them with draw_views()."
        )
    if views.offsets[0].any() or views.flips[0].any():
        raise RetrofitError("view 0 must be the image itself (offset (0, 0), no flip): build views with draw_views().")
    if (views.offsets.abs() >= torch.tensor(grid)).any():
        raise RetrofitError(f"view offsets {views.offsets.tolist()} leave the {grid[0]}x{grid[1]} grid: shift less.")


def _crop_views(source: Tensor, base: int, p: int, grid: tuple[int, int], views: Views, view_idx: Tensor,
                image_idx: Tensor) -> Tensor:
    """The pixels of each sample's view: a window of ``source`` moved by its offset, mirrored if flipped.

    ``base`` is where the centre crop starts in ``source``, in patches.
    """
    (h, w), offsets, flips = grid, (base + views.offsets[view_idx]) * p, views.flips[view_idx, image_idx]
    corners = zip(image_idx.tolist(), offsets.tolist(), strict=True)
    crops = (source[b, :, y:y + h * p, x:x + w * p] for b, (y, x) in corners)
    return torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips.tolist(), strict=True)])


class DenoisedTargets:
    """Denoised patch-feature targets from a frozen teacher (PH-Reg test-time augmentation, made robust).

    The teacher is used as given (never copied) and put in eval mode. Views are drawn from a
    ``torch.Generator`` owned by this object: the same seed gives bit-identical targets, and
    :meth:`get_rng_state` / :meth:`set_rng_state` let a training checkpoint resume exactly.
    With ``keep_clean_tokens`` only images that have outliers are shown to the teacher again,
    so a model without artifacts costs one forward per image; ``min_clean_views`` and ``bf16`` make the
    views of the others cheaper (figures in bench/README.md).
    """

    def __init__(
        self,
        teacher: nn.Module,
        settings: TargetSettings = DEFAULT_SETTINGS,
        layers: Sequence[int] = (),
        seed: int = 0,
        neurons: RegisterNeurons | None = None,
    ) -> None:
        check_supported(teacher)
        ph, pw = patch_size(teacher)
        if ph != pw:
            raise RetrofitError(f"denoised targets need square patches, the teacher has {ph}x{pw}: use another model.")
        self.teacher = teacher
        self.patch = ph
        self.settings = settings
        self.layers = block_indices(teacher, layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.neurons = neurons
        self._bf16: dict[torch.device, bool] = {}  # per device the teacher has run on: decided once, not per batch

    def _use_bf16(self, device: torch.device) -> bool:
        """``settings.bf16``, or where unset whether bf16 is native on ``device``; forcing it where bf16 is
        emulated is allowed, and said once."""
        if device not in self._bf16:
            native = native_bf16(device)
            if self.settings.bf16 and not native:
                warnings.warn(f"bf16=True on a {device.type} without native bf16 (AVX512-BF16/AMX): the teacher's "
                              "views run about 7x slower than in float32; leave bf16 unset to choose automatically.",
                              stacklevel=3)
            self._bf16[device] = native if self.settings.bf16 is None else self.settings.bf16
        return self._bf16[device]

    def use(self, layers: Sequence[int] = (), neurons: RegisterNeurons | None = None) -> None:
        """Targets for these ``layers`` too, made with these register ``neurons``; the view generator goes on where
        it was, so a resumed run draws the same views."""
        self.layers = block_indices(self.teacher, layers)
        self.neurons = neurons

    def get_rng_state(self) -> Tensor:
        """State of the view generator, for a training checkpoint."""
        return self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`get_rng_state`: the following targets repeat exactly."""
        self.generator.set_state(state)

    def margin_patches(self, grid: int) -> int:
        """Margin in patches the data should give around a grid side, so that every view is real pixels."""
        return int(self.settings.max_shift * grid)

    def draw_views(self, batch: int, grid: tuple[int, int]) -> Views:
        """Random views for the next batch (advances the generator)."""
        s = self.settings
        offsets = farthest_point_offsets(
            s.num_views, self.margin_patches(grid[0]), self.margin_patches(grid[1]), s.num_candidates, self.generator
        )
        flips = torch.rand(s.num_views, batch, generator=self.generator) < s.flip_prob
        flips[0] = False
        return Views(offsets, flips)

    def __call__(self, images: Tensor, margin: int = 0, views: Views | None = None) -> Targets:
        """Targets for ``images`` (B, 3, h*p + 2*margin*p, w*p + 2*margin*p) on the centre h x w grid.

        ``margin`` is the border of real pixels, in patches, around what the student sees (see
        :func:`crop_center`). ``views`` defaults to :meth:`draw_views`.
        """
        if images.ndim != 4:
            raise RetrofitError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}.")
        ref = next(self.teacher.parameters())
        images = images.to(device=ref.device, dtype=ref.dtype)
        center = crop_center(images, margin * self.patch)
        grid = grid_size(self.teacher, *center.shape[-2:])
        views = self.draw_views(len(images), grid) if views is None else views
        _check_views(views, len(images), grid)
        self.teacher.eval()
        use_bf16 = self._use_bf16(ref.device)
        # with register neurons the teacher's artifacts mostly never form; views are drawn for the images where some
        # remain
        registers = contextlib.nullcontext()
        if self.neurons is not None and self.neurons.count > 0:
            edit = silenced if self.settings.neurons == "silence" else test_time_registers
            registers = edit(self.teacher, self.neurons)
        bf16 = torch.autocast(ref.device.type, torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with torch.inference_mode(), bf16, registers:
            targets = self._compute(images, center, margin, views, grid)
        # Clone outside inference mode: inference tensors cannot be saved for the student's backward.
        return Targets(
            features=targets.features.clone(),
            layers={i: t.clone() for i, t in targets.layers.items()},
            coverage=targets.coverage.clone(),
            outliers=targets.outliers.clone(),
        )

    def _teacher(self, views: Tensor, real: Tensor | None = None) -> list[Tensor]:
        """Final then requested-layer patch tokens (S, h*w, D) float32; fill (and with ``mask_outliers`` the
        teacher's own outliers) hidden from attention."""
        grids = self._forward(views, real)
        if not self.settings.mask_outliers:
            return grids
        hidden = torch.stack([_outliers(g.norm(dim=-1), self.settings.outlier_k, real) for g in grids]).any(0)
        needy = hidden.any(1)
        if not needy.any():
            return grids
        keep = ~hidden[needy] if real is None else real[needy].to(hidden.device) & ~hidden[needy]
        for grid, again in zip(grids, self._forward(views[needy], keep), strict=True):
            grid[needy] = again
        return grids

    def _forward(self, views: Tensor, real: Tensor | None = None) -> list[Tensor]:
        """One teacher forward: final then requested-layer patch tokens (S, h*w, D) float32; tokens where ``real``
        is False are hidden from every query."""
        npt = self.teacher.num_prefix_tokens
        mask = None
        if real is not None and not real.all():
            keys = torch.cat([real.new_ones(len(real), npt), real], dim=1)
            mask = keys[:, None, None, :].to(views.device)  # (S, 1, 1, N): no query attends to these keys
        if not self.layers:
            return [forward_tokens(self.teacher, views, mask)[:, npt:].float()]
        with dynamic_input(self.teacher, views.shape[-2:]):
            final, inter = self.teacher.forward_intermediates(
                views, indices=list(self.layers), norm=True, output_fmt="NLC", attn_mask=mask
            )
        return [final[:, npt:].float(), *(g.float() for g in inter)]

    def _add(self, averages: list[_Average], grids: list[Tensor], outliers: list[Tensor], views: Views,
             view_idx: Tensor, image_idx: Tensor, grid: tuple[int, int]) -> None:
        """Map each view's tokens back onto the original grid (gather) and add them to the averages."""
        index, shown = (t.to(grids[0].device) for t in _alignment(views, view_idx, image_idx, grid))
        for average, tokens, out in zip(averages, grids, outliers, strict=True):
            aligned = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
            clean = shown & ~out.gather(1, index) if self.settings.drop_outlier_views else shown
            average.add(view_idx, image_idx, aligned, shown, clean)

    def _compute(self, images: Tensor, center: Tensor, margin: int, views: Views, grid: tuple[int, int]) -> Targets:
        s, b = self.settings, len(images)
        own = [torch.cat(g) for g in zip(*(self._teacher(c) for c in center.split(s.chunk_size)), strict=True)]
        own_outliers = [_outliers(g.norm(dim=-1), s.outlier_k) for g in own]
        averages = [_Average(b, grid[0] * grid[1], g.shape[-1], g.device) for g in own]
        self._add(averages, own, own_outliers, views, torch.zeros(b, dtype=torch.long), torch.arange(b), grid)
        needy = torch.ones(b, dtype=torch.bool)
        if s.keep_clean_tokens:  # only images with outliers need the other views
            needy = torch.stack([o.any(dim=1) for o in own_outliers]).any(dim=0).cpu()
        self._add_shifted(averages, own_outliers, images, margin, views, grid, needy)
        return self._finish(own, own_outliers, averages, grid)

    def _covered(self, averages: list[_Average], own_outliers: list[Tensor]) -> Tensor:
        """(B,) bool: every outlier position of the image, in every layer, has ``min_clean_views`` clean views."""
        k = self.settings.min_clean_views
        done = [((a.clean_count >= k) | ~out).all(dim=1) for a, out in zip(averages, own_outliers, strict=True)]
        return torch.stack(done).all(dim=0).cpu()

    def _add_shifted(self, averages: list[_Average], own_outliers: list[Tensor], images: Tensor, margin: int,
                     views: Views, grid: tuple[int, int], needy: Tensor) -> None:
        """Views 1.. of the needy images, view-major, ``chunk_size`` of them per teacher forward.

        With ``min_clean_views`` the views go one at a time, each to the images not yet covered.
        """
        s, p, num = self.settings, self.patch, len(views.offsets)
        pad = max(0, int(views.offsets.abs().max()) - margin)  # patches of fill needed beyond the margin
        source = F.pad(images, [pad * p] * 4) if pad and needy.any() else images
        rounds = [[v] for v in range(1, num)] if s.min_clean_views else [list(range(1, num))]
        for round_views in rounds:
            if s.min_clean_views:
                needy = needy & ~self._covered(averages, own_outliers)
            chosen = needy.nonzero().flatten()
            all_views = torch.tensor(round_views).repeat_interleave(len(chosen))
            all_images = chosen.repeat(len(round_views))
            for start in range(0, len(all_views), s.chunk_size):
                view_idx, image_idx = all_views[start:start + s.chunk_size], all_images[start:start + s.chunk_size]
                real = _real_tokens(views, view_idx, image_idx, grid, margin)
                grids = self._teacher(_crop_views(source, margin + pad, p, grid, views, view_idx, image_idx), real)
                real = real.to(grids[0].device)
                outliers = [_outliers(g.norm(dim=-1), s.outlier_k, real) for g in grids]
                self._add(averages, grids, outliers, views, view_idx, image_idx, grid)

    def _finish(self, own: list[Tensor], own_outliers: list[Tensor], averages: list[_Average],
                grid: tuple[int, int]) -> Targets:
        """The averages, or the teacher's own token where it is clean (keep_clean_tokens), as (B, h, w, ...)."""
        results = []
        for tokens, out, average in zip(own, own_outliers, averages, strict=True):
            mean, count = average.result()
            if self.settings.keep_clean_tokens:
                mean = torch.where(out[..., None], mean, tokens)
                count = torch.where(out, count, torch.ones_like(count))
            results.append((mean.unflatten(1, grid), count.unflatten(1, grid)))
        return Targets(
            features=results[0][0],
            layers={layer: mean for layer, (mean, _) in zip(self.layers, results[1:], strict=True)},
            coverage=results[0][1],
            outliers=own_outliers[0].unflatten(1, grid),
        )
