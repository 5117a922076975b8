"""Patch features as (B, H, W, D) grids: the one view of a ViT that metrics, targets and maps share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from timm.layers import Format
from torch import nn

from .errors import RetrofitError
from .surgery import check_supported


def patch_size(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else tuple(ps)


def grid_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Patch grid for an input size; a size that the patch does not divide is an error."""
    ph, pw = patch_size(model)
    if height % ph or width % pw:
        raise RetrofitError(
            f"input size {height}x{width} is not divisible by the patch size {ph}x{pw}: "
            f"resize or crop to a multiple, e.g. {height // ph * ph}x{width // pw * pw}."
        )
    return height // ph, width // pw


def square_size(model: nn.Module, img_size: int | None = None) -> int:
    """A square input side: ``img_size`` or the model's own (the smaller side); the patch must divide it."""
    size = int(img_size or min(model.patch_embed.img_size))
    grid_size(model, size, size)
    return size


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block, then the model's own train/eval mode back.

    Diagnostics of a model in training must not see dropout or drop-path, nor change its mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def dynamic_input(model: nn.Module, size: Sequence[int]) -> Iterator[None]:
    """Let a fixed-size timm ViT run at another resolution for the duration of the block.

    timm's own dynamic mode (resample the position embedding on the fly, keep the patch grid
    until after it is added) is switched on and then restored, so the caller's model is left as
    it was. A model built with ``dynamic_img_size=True`` or fed its own size is untouched.
    """
    pe = model.patch_embed
    if model.dynamic_img_size or tuple(size) == tuple(pe.img_size):
        yield
        return
    saved = (model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt)
    model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = True, False, False, Format.NHWC
    try:
        yield
    finally:
        model.dynamic_img_size, pe.strict_img_size, pe.flatten, pe.output_fmt = saved


def block_indices(model: nn.Module, layers: Sequence[int]) -> tuple[int, ...]:
    """Sorted, distinct, non-negative block indices (negative ones count from the end), range-checked.

    Sorted because timm's ``forward_intermediates`` returns blocks in model order, whatever was asked.
    """
    depth = len(model.blocks)
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise RetrofitError(
            f"layer {bad[0]} does not exist: {arch} has blocks 0..{depth - 1} (negative indices count from the end)."
        )
    return tuple(sorted({i % depth for i in layers}))


def _check_layers(model: nn.Module, layers: int | Sequence[int] | None) -> None:
    if isinstance(layers, int) and not 0 < layers <= len(model.blocks):
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise RetrofitError(f"cannot take the last {layers} blocks: {arch} has {len(model.blocks)}.")
    if layers is not None and not isinstance(layers, int):
        block_indices(model, layers)


def patch_features(
    model: nn.Module,
    images: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    norm: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    """Patch tokens of ``images`` (B, 3, H, W) as (B, H/p, W/p, D), class and register tokens split off.

    ``layers=None`` gives the final features (after the final norm) as one tensor. Otherwise a
    list with one grid per selected block (indices as timm's ``forward_intermediates`` takes
    them: an int n means the last n blocks), each passed through the final norm when ``norm``.
    """
    check_supported(model)
    if images.ndim != 4:
        raise RetrofitError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}.")
    _check_layers(model, layers)
    b = images.shape[0]
    gh, gw = grid_size(model, *images.shape[-2:])
    with dynamic_input(model, images.shape[-2:]):
        if layers is None:
            tokens = model.forward_features(images)
            return tokens[:, model.num_prefix_tokens:].reshape(b, gh, gw, -1)
        grids = model.forward_intermediates(
            images, indices=layers, norm=norm, output_fmt="NLC", intermediates_only=True
        )
    return [g.reshape(b, gh, gw, -1) for g in grids]


def forward_tokens(model: nn.Module, images: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """All final tokens (B, prefix + H*W, D) at any valid input size, optionally with an attention mask."""
    check_supported(model)
    grid_size(model, *images.shape[-2:])
    with dynamic_input(model, images.shape[-2:]):
        return model.forward_features(images, attn_mask=attn_mask)
