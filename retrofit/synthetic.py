"""An offline artifact model: synthetic images and a small ViT with planted high-norm artifact tokens.

Real artifact models cannot be downloaded here, so tests, the demo and the benchmarks plant artifacts
into a timm ViT by editing its weights, the way DESIGN.md section 6 did on DINOv2: a middle-block MLP
unit fires on flat patches and writes a large vector into the residual stream. The result is an
ordinary timm model (no hooks), so it exports and loads like any other.

The circuit lives in a few reserved residual coordinates that the original weights neither write nor
read (their rows and columns are zeroed), so it is exact and invisible to the rest of the network:

1. the patch embedding writes the responses of a few zero-mean filters, which are exactly 0 on flat
   (constant or linear-ramp) patches;
2. units in block ``block - 1`` turn them into a texture energy ``|h|`` and add it to a gate coordinate,
   onto which the position embedding also writes a penalty at every grid position but a few sparse
   *sites*;
3. one unit in ``block`` fires where the gate is 0 - a flat patch on a site - and writes ``M * e_d``;
4. the final norm's weight on coordinate ``d`` is raised so the tokens stand out after it too.

Artifacts are tied to sites, so views shifted by whole patches (DESIGN.md section 2) see the same content
without them: test-time-augmented targets can denoise them, as on real models.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .errors import RetrofitError
from .features import patch_features, patch_size
from .images import IMAGENET_MEAN, IMAGENET_STD, data_config
from .surgery import check_supported

_TEXTURE = 2.0  # texture readout of a typical textured patch, in units of the token's std
_GATE = 3.0  # gate penalty off the sites, same units
_THRESHOLD = 0.5  # the unit fires below this gate value
_SHARPNESS = 10.0  # gate unit pre-activation at gate 0


def _object_masks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One random axis-aligned rectangle or ellipse per image, (n, 1, size, size) bool."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy, cx = ((torch.rand(2, n, 1, 1, generator=g) * 0.6 + 0.2) * size).unbind()
    hy, hx = ((torch.rand(2, n, 1, 1, generator=g) * 0.2 + 0.1) * size).unbind()
    box = ((yy - cy).abs() <= hy) & ((xx - cx).abs() <= hx)
    ellipse = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1
    return torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, box, ellipse).unsqueeze(1)


def _textures(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Coloured stripe patterns with noise, (n, 3, size, size) in [0, 1]: every patch of them varies."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    theta, phase = (torch.rand(2, n, 1, 1, generator=g) * 2 * math.pi).unbind()
    period = 2.5 + torch.rand(n, 1, 1, generator=g) * 4
    stripes = torch.sin(2 * math.pi * (xx * theta.cos() + yy * theta.sin()) / period + phase).unsqueeze(1)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    noise = torch.randn(n, 3, size, size, generator=g) * 0.1
    return (colour + 0.3 * stripes + noise).clamp(0, 1)


def synthetic_images(
    n: int,
    size: int,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``n`` normalised (n, 3, size, size) images: 1-3 textured objects on a flat background.

    Flat backgrounds are where artifacts form; objects are textured at every scale above 2 px, so
    the patches they touch are not flat. The same seed gives the same images.
    """
    if n < 1 or size < 8:
        raise RetrofitError(f"synthetic_images needs n >= 1 and size >= 8, got n={n}, size={size}.")
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size)
    count = torch.randint(1, 4, (n, 1, 1, 1), generator=g)
    for j in range(3):
        mask = _object_masks(n, size, g) & (count > j)
        images = torch.where(mask, _textures(n, size, g), images)
    return TF.normalize(images, list(mean), list(std))


def _flat_filters(count: int, channels: int, p: int, g: torch.Generator) -> torch.Tensor:
    """``count`` random (channels, p, p) filters orthogonal to per-channel constants and linear ramps."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, p), torch.linspace(-1, 1, p), indexing="ij")
    basis = torch.linalg.qr(torch.stack([torch.ones(p * p), xx.flatten(), yy.flatten()], 1))[0]  # (p*p, 3)
    f = torch.randn(count, channels, p * p, generator=g)
    f = f - (f @ basis) @ basis.T
    return (f / f.flatten(1).norm(dim=1).view(-1, 1, 1)).view(count, channels, p, p)


def _pick_sites(grid: tuple[int, int], fraction: float, g: torch.Generator) -> torch.Tensor:
    """Sparse grid positions (flat indices) at least 3 patches apart, so 1-2 patch shifts leave them."""
    h, w = grid
    want = max(1, round(fraction * h * w))
    chosen: list[tuple[int, int]] = []
    for idx in torch.randperm(h * w, generator=g).tolist():
        y, x = divmod(idx, w)
        if all(max(abs(y - cy), abs(x - cx)) >= 3 for cy, cx in chosen):
            chosen.append((y, x))
        if len(chosen) == want:
            break
    return torch.tensor([y * w + x for y, x in chosen])


def _plant_block(model: nn.Module, block: int | None) -> int:
    """The block to plant in (default: a third of the depth), after checking the model can take the circuit."""
    check_supported(model)
    plain = isinstance(model, VisionTransformer) and all(
        type(b) is Block and type(b.mlp) is Mlp and b.mlp.fc1.bias is not None for b in model.blocks
    )
    if not plain or model.pos_embed is None or not isinstance(model.norm, nn.LayerNorm):
        raise RetrofitError(
            "plant_artifacts needs a plain timm VisionTransformer (pre-norm Blocks, fc1/GELU/fc2 MLPs with biases, "
            "a position embedding, a final LayerNorm): use e.g. test_vit or vit_small_patch14_dinov2."
        )
    depth = len(model.blocks)
    block = max(1, depth // 3) if block is None else block
    if not 1 <= block < depth:
        raise RetrofitError(f"block must be in 1..{depth - 1} for this {depth}-block model, got {block}.")
    return block


def _isolate(model: nn.Module, res: torch.Tensor) -> None:
    """Zero the reserved coordinates in every original writer and reader of the residual stream."""
    with torch.no_grad():
        for name in ("pos_embed", "cls_token", "reg_token"):
            t = getattr(model, name, None)
            if t is not None:
                t[..., res] = 0
        writers = [model.patch_embed.proj] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2)]
        for lin in writers:
            lin.weight[res] = 0
            if lin.bias is not None:
                lin.bias[res] = 0
        for b in model.blocks:
            b.attn.qkv.weight[:, res] = 0
            b.mlp.fc1.weight[:, res] = 0
            ls = getattr(b, "ls2", None)
            if hasattr(ls, "gamma"):  # layer scale would rescale what the circuit writes
                ls.gamma[res] = 1


def _read(norm: nn.LayerNorm, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 row and bias that read ``x . direction / std(x)`` through ``norm`` (direction sums to 0)."""
    gamma = norm.weight.detach()
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(gamma)
    row = direction / gamma
    return row, -(row * beta).sum()


def _set_unit(mlp: nn.Module, unit: int, row: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
    """Hidden unit ``unit`` reads ``row . x + bias`` and writes ``out`` (callers hold no_grad)."""
    mlp.fc1.weight[unit] = row
    mlp.fc1.bias[unit] = bias
    mlp.fc2.weight[:, unit] = out


@contextmanager
def _capture(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the input of ``module`` during a forward (calibration only; removed afterwards)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def _patch_inputs(model: nn.Module, images: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The patch tokens entering ``module`` when ``model`` sees ``images``, (B, N, D)."""
    with _capture(module) as seen:
        patch_features(model, images)
    return seen[0][:, model.num_prefix_tokens:]


def _token_std(model: nn.Module, images: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Median per-token std of the residual stream entering ``norm``: the unit a LayerNorm reads in."""
    return _patch_inputs(model, images, norm).std(dim=-1).median()


def _activations(model: nn.Module, images: torch.Tensor, mlp: nn.Module, units: list[int]) -> torch.Tensor:
    """GELU outputs of some MLP units on every patch token, (B, N, len(units))."""
    x = _patch_inputs(model, images, mlp)
    return mlp.act(x @ mlp.fc1.weight[units].T + mlp.fc1.bias[units])


def _filter_responses(images: torch.Tensor, filters: torch.Tensor, p: int) -> torch.Tensor:
    """Response of every patch to every filter, (B * N, filters)."""
    return F.conv2d(images, filters, stride=p).flatten(2).transpose(1, 2).flatten(0, 1)


def _typical(values: torch.Tensor) -> torch.Tensor:
    """Median magnitude over the non-zero entries (flat patches give exact zeros)."""
    mags = values.abs().flatten()
    return mags[mags > 1e-4 * mags.max()].median()


def _calibrate_final_norm(model: nn.Module, images: torch.Tensor, d: int, strength: float) -> None:
    """Set the final norm's weight on ``d`` so artifact tokens have ``strength`` x the median norm after it."""
    feats = patch_features(model, images).flatten(0, 2)
    gamma = model.norm.weight
    coord = feats[:, d] / gamma[d]  # the normalised coordinate, before the weight
    artifact = coord.abs() > 0.5 * math.sqrt(feats.shape[1])
    if not artifact.any():
        raise RetrofitError("no flat patch fell on an artifact site in the calibration images: pass more images.")
    median = feats[~artifact].norm(dim=1).median()
    rest = (feats[artifact].norm(dim=1) ** 2 - feats[artifact, d] ** 2).median()
    gamma[d] = ((strength * median) ** 2 - rest).clamp_min(0).sqrt() / coord[artifact].abs().median()


def _unit_vector(dim: int, a: int, b: int) -> torch.Tensor:
    """(e_a - e_b) / sqrt(2): a direction that LayerNorm's mean subtraction leaves alone."""
    v = torch.zeros(dim)
    v[a], v[b] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    return v


def plant_artifacts(
    model: nn.Module,
    block: int | None = None,
    strength: float = 8.0,
    site_fraction: float = 0.05,
    num_filters: int = 2,
    images: torch.Tensor | None = None,
    seed: int = 0,
    silent: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose flat patch tokens on a few grid sites carry high-norm artifacts.

    ``block``: the first block whose output has artifacts (default: a third of the depth).
    ``strength``: artifact norm / median patch norm after the final norm (raw residual: at least that).
    ``site_fraction``: share of grid positions that can host an artifact; only flat patches there do,
    so on :func:`synthetic_images` about ``site_fraction * 0.6`` of the patch tokens are artifacts.
    ``images``: normalised calibration images at the model's resolution (default: synthetic ones).
    ``silent``: the same edited model with the artifact unit switched off - the artifact-free reference.
    Plant at the resolution the model will run at: sites are fixed positions of the position embedding.
    The input model is not modified.
    """
    block = _plant_block(model, block)
    if strength <= 1 or not 0 < site_fraction <= 0.5 or num_filters < 1:
        raise RetrofitError(
            f"need strength > 1, 0 < site_fraction <= 0.5 and num_filters >= 1, got {strength}, "
            f"{site_fraction}, {num_filters}."
        )
    ref = next(model.parameters())
    planted = copy.deepcopy(model).float().cpu().eval()
    dim, p = planted.embed_dim, patch_size(planted)[0]
    grid, size = tuple(planted.patch_embed.grid_size), tuple(planted.patch_embed.img_size)
    if images is None:
        cfg = data_config(planted)
        images = synthetic_images(16, size[0], seed=seed, mean=cfg["mean"], std=cfg["std"])
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, *size):
        raise RetrofitError(
            f"calibration images must be (N, 3, {size[0]}, {size[1]}) for this model, got {tuple(images.shape)}."
        )
    g = torch.Generator().manual_seed(seed)
    coords = torch.randperm(dim, generator=g)[: 2 * num_filters + 3]
    _isolate(planted, coords)
    pre, gate_blk = planted.blocks[block - 1], planted.blocks[block]
    u = [_unit_vector(dim, coords[2 * i], coords[2 * i + 1]) for i in range(num_filters)]
    w = _unit_vector(dim, coords[-3], coords[-2])
    d = int(coords[-1])
    hidden = planted.blocks[block].mlp.fc1.out_features
    units = torch.randperm(hidden, generator=g)[: 2 * num_filters + 1].tolist()

    with torch.no_grad():
        # 1. zero-mean filter responses into the patch embedding: _TEXTURE token-stds on textured patches
        filters = _flat_filters(num_filters, planted.patch_embed.proj.in_channels, p, g)
        response = _filter_responses(images, filters, p)
        sigma = _token_std(planted, images, pre.norm2)
        for i in range(num_filters):
            gain = _TEXTURE * sigma / _typical(response[:, i])
            planted.patch_embed.proj.weight += gain * u[i].view(dim, 1, 1, 1) * filters[i]
        # 2. texture energy gelu(r) + gelu(-r) per filter onto the gate direction w, plus a penalty off-site
        for i in range(num_filters):
            row, bias = _read(pre.norm2, u[i])
            _set_unit(pre.mlp, units[2 * i], row, bias, w)
            _set_unit(pre.mlp, units[2 * i + 1], -row, -bias, w)
        energy = _activations(planted, images, pre.mlp, units[:-1]).sum(-1)
        sigma = _token_std(planted, images, gate_blk.norm2)
        pre.mlp.fc2.weight[:, units[:-1]] *= _GATE * sigma / _typical(energy)
        off_site = torch.ones(grid[0] * grid[1], dtype=torch.bool)
        off_site[_pick_sites(grid, site_fraction, g)] = False
        npt = 0 if planted.no_embed_class else planted.num_prefix_tokens
        planted.pos_embed[0, npt:][off_site] += _GATE * sigma * w
        # 3. the gate unit: fires where the gate reads below _THRESHOLD token-stds, writes along e_d
        row, bias = _read(gate_blk.norm2, w)
        scale = -_SHARPNESS / _THRESHOLD
        out = torch.zeros(dim)
        out[d] = strength * _patch_inputs(planted, images, planted.norm).norm(dim=-1).median() / _SHARPNESS
        _set_unit(gate_blk.mlp, units[-1], scale * row, scale * bias + _SHARPNESS, out)
        # 4. raise the final norm's weight on e_d so the artifacts stand out after it as well
        planted.norm.bias[d] = 0
        _calibrate_final_norm(planted, images, d, strength)
        if silent:
            gate_blk.mlp.fc2.weight[:, units[-1]] = 0
    return planted.to(device=ref.device, dtype=ref.dtype)
