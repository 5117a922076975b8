"""The residual stream block by block: where a ViT's artifacts are made.

Artifacts are made inside the network: MLP units write a large vector into a few channels of the residual stream,
and every later block carries it on. The raw block outputs (before any norm) are where Darcet et al. and the
massive-activation papers see them. The final norm can hide them in intermediate blocks - its weight need not
favour the channels they live in - so nothing here applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import forward_tokens, grid_size, inference, model_device
from .progress import track


def blocks_text(blocks: Sequence[int]) -> str:
    """``block 4``, ``blocks 4-6`` (a run) or ``blocks 4, 6``; empty for none."""
    blocks = sorted(blocks)
    if not blocks:
        return ""
    if len(blocks) == 1:
        return f"block {blocks[0]}"
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}-{blocks[-1]}"
    return "blocks " + ", ".join(map(str, blocks))


@dataclass(frozen=True)
class ResidualProfile:
    """How artifacts build up in the residual stream, block by block (JSON-able; see :func:`residual_profile`)."""

    outliers: list[float]
    """Share of patch tokens that each block's raw output makes high-norm outliers (norm > k x the image median)
    and that were not outliers in the embedded patches already."""
    max_ratio: list[float]
    """Largest patch-token norm over its image's median norm, per block."""
    growth: list[float]
    """How much each block builds the artifact tokens: the smaller of how far it moves them along their direction
    and how much it raises their norm above the image median, each as a share of the largest such step (about 1
    for a block that makes them; about 0 or below for one that only carries or reads them)."""
    start: int | None
    """First block where the artifacts build (None: no artifacts)."""
    end: int | None
    """Last block where they build."""
    peak: int | None
    """The block whose outliers are the artifact tokens: the first that holds 90% of the largest outlier share."""

    @property
    def blocks(self) -> list[int]:
        """The blocks where artifacts build, first to last (empty for a model without artifacts)."""
        return [] if self.start is None else list(range(self.start, self.end + 1))

    def describe(self) -> str:
        """``blocks 4-6`` / ``block 4`` / ``no artifacts``, as run lines and reports put it."""
        return blocks_text(self.blocks) or "no artifacts"


@contextmanager
def _residual_hooks(model: nn.Module, record: Callable[[int, Tensor], None]) -> Iterator[None]:
    """``record(i, patch tokens)`` for the input of the first block (i = 0: the embedded patches) and the raw
    output of every block (i = b + 1 for block b), during each forward inside the block."""

    def patches(x: Tensor) -> Tensor:
        return x[:, model.num_prefix_tokens:]  # read at call time: test-time registers add prefix tokens

    handles = [model.blocks[0].register_forward_pre_hook(lambda _m, args: record(0, patches(args[0])))]
    handles += [blk.register_forward_hook(lambda _m, _a, out, i=i: record(i + 1, patches(out)))
                for i, blk in enumerate(model.blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forwards(model: nn.Module, images: Tensor, batch_size: int, description: str, progress: bool = False,
             before: Callable[[slice], None] | None = None) -> Iterator[slice]:
    """Run ``model`` over ``images`` in batches (eval mode, no gradients) for the hooks it carries: ``before(batch)``
    is called ahead of each forward, and each batch's slice is yielded after it."""
    for start in track(range(0, len(images), batch_size), description, progress):
        batch = slice(start, start + batch_size)
        if before is not None:
            before(batch)
        with inference(model):
            forward_tokens(model, images[batch].to(model_device(model)))
        yield batch


def residual_norms(model: nn.Module, images: Tensor, batch_size: int = 8, progress: bool = False) -> Tensor:
    """Patch-token L2 norms in the residual stream, (images, 1 + blocks, tokens) float32 on the CPU: index 0 is
    the input of the first block (the embedded patches), index b + 1 the raw output of block b."""
    seen: dict[int, Tensor] = {}
    norms = []
    with _residual_hooks(model, lambda i, x: seen.__setitem__(i, x.float().norm(dim=-1).cpu())):
        for _ in forwards(model, images, batch_size, "measuring the residual stream", progress):
            norms.append(torch.stack([seen[i] for i in range(len(model.blocks) + 1)], dim=1))
    return torch.cat(norms)


def made_outliers(norms: Tensor, k: float = 3.0) -> Tensor:
    """(images, blocks, tokens) bool from :func:`residual_norms`: the patch tokens a block's raw output makes
    high-norm outliers (norm > ``k`` x the image median) that were not already so in the embedded patches (bright
    or busy patches can be, in a model without any artifact)."""
    ratio = norms / norms.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    return (ratio[:, 1:] > k) & ~(ratio[:, :1] > k)


def artifact_tokens(model: nn.Module, images: Tensor, k: float = 3.0, batch_size: int = 8) -> Tensor:
    """Where ``model`` has artifacts on ``images``, (B, h, w) bool: the patch tokens that any block makes high-norm
    outliers (:func:`made_outliers`). The final features need not show them."""
    made = made_outliers(residual_norms(model, images, batch_size), k).any(dim=1)
    return made.view(len(images), *grid_size(model, *images.shape[-2:]))


def _separation(model: nn.Module, images: Tensor, tokens: Tensor, batch_size: int, progress: bool) -> Tensor:
    """Mean of the ``tokens`` (images, patches) bool minus the mean of the other patch tokens, at every point of the
    residual stream as :func:`residual_norms` indexes it, (1 + blocks, D) float64."""
    depth, current = len(model.blocks) + 1, {}
    chosen = torch.zeros(depth, model.embed_dim, dtype=torch.float64, device=model_device(model))
    total = torch.zeros_like(chosen)

    def record(i: int, x: Tensor) -> None:
        mask = current["mask"].to(x.device)
        chosen[i] += x[mask].double().sum(0)
        total[i] += x.double().sum(dim=(0, 1))

    with _residual_hooks(model, record):
        for _ in forwards(model, images, batch_size, "following the artifacts", progress,
                          before=lambda batch: current.__setitem__("mask", tokens[batch])):
            pass
    count, others = tokens.sum().item(), tokens.numel() - tokens.sum().item()
    return chosen / count - (total - chosen) / max(others, 1)


def _direction(separation: Tensor, energy: float = 0.9) -> Tensor:
    """The artifacts' direction: ``separation`` (D,) kept on the fewest channels that hold ``energy`` of its square,
    unit length. Massive activations live in a few channels; the rest is content in which flat patches differ
    from others, and it grows with the whole stream in late blocks without the artifacts growing."""
    power = separation.pow(2)
    order = power.argsort(descending=True)
    count = int((power[order].cumsum(0) < energy * power.sum()).sum()) + 1
    kept = torch.zeros_like(separation)
    kept[order[:count]] = separation[order[:count]]
    return F.normalize(kept, dim=0)


def _shares(steps: Tensor) -> Tensor:
    """Each step as a share of the largest one."""
    return steps / steps.max().clamp_min(1e-12)


def residual_profile(
    model: nn.Module,
    images: Tensor,
    k: float = 3.0,
    min_fraction: float = 0.002,
    min_growth: float = 0.2,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[ResidualProfile, Tensor]:
    """Where ``model``'s artifacts build, from normalised ``images`` (N, 3, H, W), and the artifact tokens
    (N, patches) bool.

    A block's outliers are those it makes (:func:`made_outliers`). A model
    has artifacts when some block holds at least ``min_fraction`` of them; the artifact tokens are those of the
    first block that holds 90% of the largest share. Their *direction* is what the blocks up to there have added to
    the difference between their mean and the other tokens' mean, on the few channels that hold most of it. A
    block builds them where it both moves them along that direction and raises their norm above their image's
    median: its *growth* is the smaller of the two, each as a share of the largest such step. They build in the
    blocks whose growth is at least ``min_growth``: one block for a single source, a run of blocks where they grow
    layer by layer; not a block that only carries them, reads them (and writes elsewhere) or adds to what sets
    their patches apart (flatness) without making them stand out.
    """
    norms = residual_norms(model, images, batch_size, progress)
    made = made_outliers(norms, k)  # (images, blocks, patches)
    ratio = norms[:, 1:] / norms[:, 1:].median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    fractions, max_ratio = made.float().mean(dim=(0, 2)), ratio.amax(dim=(0, 2))
    largest = fractions.max().item()
    if largest < min_fraction:
        none = ResidualProfile(fractions.tolist(), max_ratio.tolist(), [0.0] * len(fractions), None, None, None)
        return none, torch.zeros_like(made[:, 0])
    peak = int((fractions >= 0.9 * largest).nonzero()[0])
    tokens = made[:, peak]
    added = _separation(model, images, tokens, batch_size, progress)
    added = added - added[0]  # what the blocks add to how the artifact tokens differ from the others
    along = (added @ _direction(added[peak + 1])).float().cpu()
    excess = (norms - norms.median(dim=-1, keepdim=True).values).permute(1, 0, 2)[:, tokens].mean(dim=1)
    growth = torch.minimum(_shares(torch.diff(along)), _shares(torch.diff(excess)))
    building = (growth >= min_growth).nonzero().flatten()
    profile = ResidualProfile(fractions.tolist(), max_ratio.tolist(), growth.tolist(), int(building[0]),
                              int(building[-1]), peak)
    return profile, tokens
