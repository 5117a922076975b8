"""An offline artifact model: synthetic images and a ViT whose own MLP units make high-norm artifact tokens.

Real artifacts cannot be downloaded here, so tests, the demo and the benchmarks plant them into a timm ViT
by editing its weights, the way they arise in trained models (Darcet et al. 2024; Jiang et al. 2025,
"register neurons"; Sun et al. 2024, "massive activations"):

1. a few MLP units of one middle block read a direction of the block's own features that rises on
   low-information patches and, more weakly, on some regions of the image grid (a linear readout of the
   model's features, fitted to pixel flatness plus a smooth field over grid positions): content x position;
2. where that readout passes a threshold they write a large vector into two residual dimensions
   ("massive" dimensions that nothing else writes to);
3. every later block reads those dimensions as usual, so an artifact token changes its neighbours through
   attention and carries little of its own content; the final norm's weight on them is raised so the
   tokens stand out after it (about 8x the median norm).

``silent=True`` gives the same edited network with the artifact units' output switched off: the
artifact-free twin that retrofitted models are scored against. The result is an ordinary timm model
(no hooks), so it exports and loads like any other, and works at other input sizes too (the readout
follows the resampled position embedding).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from .errors import RetrofitError
from .features import patch_size
from .images import IMAGENET_MEAN, IMAGENET_STD, data_config
from .surgery import check_supported

_TEXTURE = 4.0  # filter response on a typical textured patch, in stds of the model's own signal there
_GATE = 3.0  # spread of the texture energy the gate reads, same unit
_SHARPNESS = 100.0  # the gate goes from off to full output over 1/_SHARPNESS of its readout's std
_FILTERS = 2  # zero-mean texture filters behind the energy written into models that lack it
_RIDGE = 0.1  # readout ridge penalty, as a fraction of the mean feature variance
_MIN_EXPLAINED = 0.5  # readout R^2 below which the model is first given texture and position features
Channels = Literal["random", "norm"]
Gate = tuple[nn.Linear, nn.Linear, Tensor]  # a unit group: its block's fc1 and fc2, and its unit indices


def _object_masks(n: int, size: int, g: torch.Generator) -> Tensor:
    """One random axis-aligned rectangle or ellipse per image, (n, 1, size, size) bool."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy, cx = ((torch.rand(2, n, 1, 1, generator=g) * 0.6 + 0.2) * size).unbind()
    hy, hx = ((torch.rand(2, n, 1, 1, generator=g) * 0.2 + 0.1) * size).unbind()
    box = ((yy - cy).abs() <= hy) & ((xx - cx).abs() <= hx)
    ellipse = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1
    return torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, box, ellipse).unsqueeze(1)


def _textures(n: int, size: int, g: torch.Generator) -> Tensor:
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
) -> Tensor:
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


def position_field(grid: tuple[int, int], seed: int, bumps: int = 12, width: float = 0.1) -> Tensor:
    """A random field of ``bumps`` Gaussian bumps (half up, half down) over the patch grid, (h*w,), zero mean
    and unit std. Defined on normalised coordinates, so a seed gives the same field at every grid size."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(bumps, 2, generator=g)
    signs = torch.tensor([1.0, -1.0]).repeat((bumps + 1) // 2)[:bumps]
    ys, xs = ((torch.arange(n) + 0.5) / n for n in grid)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    dist2 = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    field = (signs * torch.exp(-dist2 / (2 * width**2))).sum(-1).flatten()
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _plant_blocks(model: nn.Module, blocks: int | Sequence[int] | None) -> list[int]:
    """The consecutive blocks to plant in (default: the one at a third of the depth), after checking the model can
    take the circuit."""
    check_supported(model)
    plain = isinstance(model, VisionTransformer) and all(
        type(b) is Block and type(b.mlp) is Mlp and b.mlp.fc1.bias is not None
        and isinstance(b.attn.q_norm, nn.Identity)
        for b in model.blocks
    )
    if not plain or model.pos_embed is None or not isinstance(model.norm, nn.LayerNorm):
        raise RetrofitError(
            "plant_artifacts needs a plain timm VisionTransformer (pre-norm Blocks, fc1/GELU/fc2 MLPs with biases, "
            "no qk-norm, a position embedding, a final LayerNorm): use e.g. test_vit or vit_small_patch14_dinov2."
        )
    depth = len(model.blocks)
    blocks = [max(1, depth // 3)] if blocks is None else [blocks] if isinstance(blocks, int) else sorted(blocks)
    consecutive = len(blocks) > 0 and blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    if not consecutive or not 1 <= blocks[0] <= blocks[-1] < depth:
        raise RetrofitError(f"blocks must be consecutive and in 1..{depth - 1} for this {depth}-block model, "
                            f"got {blocks}.")
    return blocks


def _flat_filters(count: int, channels: int, p: int, g: torch.Generator) -> Tensor:
    """``count`` random (channels, p, p) filters orthogonal to per-channel constants and linear ramps."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, p), torch.linspace(-1, 1, p), indexing="ij")
    basis = torch.linalg.qr(torch.stack([torch.ones(p * p), xx.flatten(), yy.flatten()], 1))[0]  # (p*p, 3)
    f = torch.randn(count, channels, p * p, generator=g)
    f = f - (f @ basis) @ basis.T
    return (f / f.flatten(1).norm(dim=1).view(-1, 1, 1)).view(count, channels, p, p)


def _flat_responses(proj: nn.Conv2d) -> Tensor:
    """What the patch embedding writes for constant and linear-ramp patches, (3 * channels + 1, D)."""
    _, c, ph, pw = proj.weight.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, ph), torch.linspace(-1, 1, pw), indexing="ij")
    w = proj.weight.detach().float()
    rows = [(w[:, ch] * pattern).sum(dim=(1, 2)) for ch in range(c) for pattern in (1.0, yy, xx)]
    bias = proj.bias.detach().float() if proj.bias is not None else w.new_zeros(len(w))
    return torch.stack([*rows, bias])


def _quiet_directions(features: Tensor, count: int, exclude: Tensor, g: torch.Generator) -> Tensor:
    """``count`` unit directions (rows) along which ``features`` (N, D) vary little, orthogonal to the rows of
    ``exclude`` and to the all-ones vector (LayerNorm keeps them): where a small planted signal stands out."""
    dim = features.shape[1]
    taken = torch.linalg.qr(torch.cat([features.new_ones(1, dim), exclude.float()]).T)[0]  # (D, k)
    free = torch.linalg.qr(torch.eye(dim, device=features.device) - taken @ taken.T)[0][:, : dim - taken.shape[1]]
    x = (features - features.mean(0)) @ free
    _, vectors = torch.linalg.eigh(x.T @ x / len(x))  # ascending variance
    pool = vectors[:, : min(4 * count, vectors.shape[1])]
    mix = torch.linalg.qr(torch.randn(pool.shape[1], count, generator=g).to(pool.device))[0]  # a random pick
    return (free @ pool @ mix).T


def _silence_writers(model: nn.Module, dims: Tensor) -> None:
    """Zero what every original writer puts into ``dims``; every reader is kept, so later blocks see them."""
    for name in ("pos_embed", "cls_token", "reg_token"):
        t = getattr(model, name, None)
        if t is not None:
            t[..., dims] = 0
    for lin in [model.patch_embed.proj] + [m for b in model.blocks for m in (b.attn.proj, b.mlp.fc2)]:
        lin.weight[dims] = 0
        if lin.bias is not None:
            lin.bias[dims] = 0


class _Seen(Exception):
    """Stops a calibration forward once the tensor it was run for has been recorded."""


def _patch_tokens(model: nn.Module, images: Tensor, module: nn.Module, output: bool = False) -> Tensor:
    """The patch tokens entering (or leaving) ``module`` when ``model`` sees ``images``, (B, N, ...).

    The forward stops there: calibration never pays for the blocks after ``module``.
    """
    seen: list[Tensor] = []

    def record(tensor: Tensor) -> None:
        seen.append(tensor.detach())
        raise _Seen

    if output:
        handle = module.register_forward_hook(lambda _m, _a, out: record(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: record(args[0]))
    try:
        model.forward_features(images)
    except _Seen:
        pass
    finally:
        handle.remove()
    return seen[0][:, model.num_prefix_tokens:]


def _read(norm: nn.LayerNorm, direction: Tensor) -> tuple[Tensor, Tensor]:
    """fc1 row and bias that read ``x . direction / std(x)`` through ``norm`` (direction sums to 0)."""
    gamma = norm.weight.detach()
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(gamma)
    row = direction / gamma
    return row, -(row * beta).sum()


def _readout(model: nn.Module, images: Tensor, norm: nn.LayerNorm, direction: Tensor) -> Tensor:
    """``x . direction / std(x)`` of every patch token entering ``norm`` (what :func:`_read` units see), (B, N)."""
    x = _patch_tokens(model, images, norm)
    return (x @ direction) / x.std(dim=-1, unbiased=False)


def _set_units(mlp: nn.Module, units: Sequence[int], rows: Tensor, biases: Tensor, outs: Tensor) -> None:
    """Hidden units ``units`` read ``rows @ x + biases`` and write ``outs`` (one per row); callers hold no_grad."""
    mlp.fc1.weight[units] = rows
    mlp.fc1.bias[units] = biases
    mlp.fc2.weight[:, units] = outs.T


def _texture_energy(planted: nn.Module, images: Tensor, block: int, u: Tensor, w: Tensor, units: list[int],
                    g: torch.Generator) -> Tensor:
    """Patch embedding -> zero-mean filter responses along ``u``; block ``block - 1`` -> their size along ``w``.

    Flat patches give no response, so the energy read along ``w`` at ``block`` is low on them, up to what
    the network itself carries along these (quiet, but shared) directions. Returns that own readout of
    ``w``, (B, N), the unit in which the energy and the position bias are sized.
    """
    p, pre, gate_norm = patch_size(planted)[0], planted.blocks[block - 1], planted.blocks[block].norm2
    own = _readout(planted, images, gate_norm, w)
    filters = _flat_filters(len(u), planted.patch_embed.proj.in_channels, p, g).to(images.device)
    response = F.conv2d(images, filters, stride=p).flatten(2)  # (B, filters, N)
    carried = _patch_tokens(planted, images, pre.norm2).flatten(0, 1) @ u.T  # (B * N, filters), raw units
    for i in range(len(u)):
        typical = response[:, i].abs().flatten()
        typical = typical[typical > 1e-4 * typical.max()].median()
        gain = _TEXTURE * carried[:, i].std() / typical
        planted.patch_embed.proj.weight += gain * u[i].view(-1, 1, 1, 1) * filters[i]
    for i in range(len(u)):  # gelu(r) + gelu(-r) ~ |r|
        row, bias = _read(pre.norm2, u[i])
        _set_units(pre.mlp, units[2 * i: 2 * i + 2], torch.stack([row, -row]), torch.stack([bias, -bias]),
                   torch.stack([w, w]))
    energy = _readout(planted, images, gate_norm, w) - own
    pre.mlp.fc2.weight[:, units] *= _GATE * own.std() / energy.std().clamp_min(1e-6)
    return own


def _position_bias(planted: nn.Module, images: Tensor, block: int, w: Tensor, field: Tensor, size: Tensor) -> None:
    """Subtract ``field`` along ``w`` in the position embedding, so that the readout of ``w`` at ``block``
    falls by ``size`` x the field: the gate opens more easily where the field is high."""
    npt = 0 if planted.no_embed_class else planted.num_prefix_tokens
    gate_norm = planted.blocks[block].norm2
    before = _readout(planted, images, gate_norm, w)
    planted.pos_embed[0, npt:] -= field[:, None] * w
    drop = (before - _readout(planted, images, gate_norm, w)).mean(0)  # per position
    slope = (drop * field).sum() / field.pow(2).sum()  # readout per unit written
    planted.pos_embed[0, npt:] -= (size / slope.clamp_min(1e-6) - 1) * field[:, None] * w


def _artifact_direction(planted: nn.Module, images: Tensor, dims: Tensor) -> Tensor:
    """How far each patch token entering the final norm lies along ``+dims[0] -dims[1]``, in token stds."""
    x = _patch_tokens(planted, images, planted.norm)
    return (x[..., dims[0]] - x[..., dims[1]]) / math.sqrt(2) / x.std(dim=-1, unbiased=False)


def _flatness_readings(images: Tensor, patch: int) -> Tensor:
    """Five ways to tell a low-information patch, (5, B * N), each standardised, high where the patch is flat:
    per-channel pixel spread, luminance spread, gradient energy, coarse (2x2-pooled) spread and luminance range."""
    cells = F.unfold(images.float(), patch, stride=patch).unflatten(1, (images.shape[1], patch, patch))  # (B,C,p,p,N)
    luma = cells.mean(dim=1)  # (B, p, p, N)
    half = patch // 2
    coarse = luma[:, : 2 * half, : 2 * half].unflatten(1, (half, 2)).unflatten(3, (half, 2)).mean(dim=(2, 4))
    measures = torch.stack([
        cells.flatten(2, 3).std(dim=2).mean(dim=1),
        luma.flatten(1, 2).std(dim=1),
        luma.diff(dim=1).abs().mean(dim=(1, 2)) + luma.diff(dim=2).abs().mean(dim=(1, 2)),
        coarse.flatten(1, 2).std(dim=1),
        luma.amax(dim=(1, 2)) - luma.amin(dim=(1, 2)),
    ]).flatten(1)
    flat = -torch.log(measures + 0.2)  # saturates on the flattest patches: a photo set without them still has artifacts
    return (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)


def _propensity(readings: Tensor, mix: Tensor, field: Tensor, position_weight: float) -> Tensor:
    """Where one unit group wants artifacts, per patch token (B * N,): its own mix of the flatness readings,
    standardised, plus ``position_weight`` x its position field (N,)."""
    content = mix @ readings
    content = (content - content.mean()) / content.std().clamp_min(1e-6)
    return content + position_weight * field.repeat(len(content) // len(field))


def _fit_readout(features: Tensor, target: Tensor) -> tuple[Tensor, Tensor, float]:
    """Ridge regression ``features @ row + bias ~ target`` over tokens (N, D): the row, the bias and the R^2."""
    mean_f, mean_t = features.mean(0), target.mean()
    x = features - mean_f
    cov = x.T @ x / len(x)
    ridge = _RIDGE * cov.diagonal().mean().clamp_min(1e-12)
    row = torch.linalg.solve(cov + ridge * torch.eye(len(cov), device=cov.device), x.T @ (target - mean_t) / len(x))
    fitted = x @ row
    explained = 1 - (fitted - (target - mean_t)).pow(2).mean() / target.var().clamp_min(1e-12)
    return row, mean_t - mean_f @ row, explained.item()


def _write_propensity(planted: nn.Module, images: Tensor, blocks: list[int], dims: Tensor, fields: list[Tensor],
                      position_weight: float, units: list[int], g: torch.Generator) -> None:
    """Give a model whose features do not carry patch texture and grid position (a random init) both, along
    quiet directions: texture energy from the block before the first planted one, and each unit group's position
    field in the position embedding (``fields[i]`` for the group i, whose gate sits in ``blocks[i]``)."""
    dim, first = planted.embed_dim, blocks[0]
    avoid = torch.cat([torch.eye(dim, device=images.device)[dims], _flat_responses(planted.patch_embed.proj)])
    u = _quiet_directions(_patch_tokens(planted, images, planted.blocks[first - 1].norm2).flatten(0, 1),
                          _FILTERS, avoid, g)
    ws = _quiet_directions(_patch_tokens(planted, images, planted.blocks[first].norm2).flatten(0, 1),
                           1 + len(fields), torch.cat([avoid, u]), g)
    own = _texture_energy(planted, images, first, u, ws[0], units, g)
    for w, field, block in zip(ws[1:], fields, blocks, strict=True):
        _position_bias(planted, images, block, w, field, position_weight * _GATE * own.std())


def _even_readers(planted: nn.Module, after: int, dims: Tensor) -> None:
    """The norms of the blocks after ``after`` weigh ``dims`` alike (the mean weight and bias), so that the strength
    with which those blocks read an artifact can be set apart from what they read in every other token."""
    for blk in planted.blocks[after + 1:]:
        for norm in (blk.norm1, blk.norm2):
            norm.weight[dims] = norm.weight[dims].abs().mean()
            if norm.bias is not None:
                norm.bias[dims] = norm.bias[dims].mean()


def _calibrate_influence(planted: nn.Module, images: Tensor, after: int, dims: Tensor, gates: list[Gate],
                         disturbance: float) -> None:
    """Scale how strongly the blocks after ``after`` read an artifact, so that the other patch tokens' mean cosine
    to the artifact-free twin (``gates``: each fc2 with its artifact units, switched off) is ``1 - disturbance``.

    A token that carries nothing on ``dims`` (every token the artifact units leave alone) reads only the mean of
    the two weight columns there (their norms weigh both alike, :func:`_even_readers`); an artifact, ``+x`` on one
    and ``-x`` on the other, reads their half-difference, which is what gets scaled. The gates' own rows keep how
    they read the artifacts of earlier groups.
    """
    readers = []
    for blk in planted.blocks[after + 1:]:
        for reader in (blk.attn.qkv, blk.mlp.fc1):
            first, second = reader.weight[:, dims[0]].clone(), reader.weight[:, dims[1]].clone()
            readers.append((reader, (first + second) / 2, (first - second) / 2))
    kept = [(fc1, units, fc1.weight[units][:, dims].clone()) for fc1, _, units in gates]
    written = [fc2.weight[:, units].clone() for _, fc2, units in gates]
    for _, fc2, units in gates:
        fc2.weight[:, units] = 0
    twin = _patch_tokens(planted, images, planted.norm, output=True)
    for (_, fc2, units), w in zip(gates, written, strict=True):
        fc2.weight[:, units] = w
    others = _artifact_direction(planted, images, dims).abs() < 1

    def excess(log_gain: float) -> float:
        for reader, common, half in readers:
            reader.weight[:, dims[0]] = common + math.exp(log_gain) * half
            reader.weight[:, dims[1]] = common - math.exp(log_gain) * half
        for fc1, units, rows in kept:
            fc1.weight[units[:, None], dims] = rows
        out = _patch_tokens(planted, images, planted.norm, output=True)
        return 1 - F.cosine_similarity(out, twin, dim=-1)[others].mean().item() - disturbance

    low, high = math.log(0.1), math.log(100.0)  # at least a tenth of the model's own reading
    for _ in range(10):  # bisection in log-gain: the disturbance grows with the gain
        mid = (low + high) / 2
        low, high = (mid, high) if excess(mid) < 0 else (low, mid)
    excess((low + high) / 2)


def _calibrate_final_norm(model: nn.Module, images: Tensor, dims: Tensor, strength: float) -> None:
    """Set the final norm's weight on ``dims`` so artifact tokens have ``strength`` x the median norm after it."""
    normed = _patch_tokens(model, images, model.norm, output=True).flatten(0, 1)
    gamma = model.norm.weight
    coords = normed[:, dims] / gamma[dims]  # the normalised coordinates, before the weight
    massive = (coords[:, 0] - coords[:, 1]).abs() / math.sqrt(2)
    artifact = massive > 0.5 * math.sqrt(normed.shape[1])
    if not artifact.any():
        raise RetrofitError("no artifact formed on the calibration images: pass more or other images.")
    median = normed[~artifact].norm(dim=1).median()
    rest = (normed[artifact].norm(dim=1) ** 2 - normed[artifact][:, dims].pow(2).sum(1)).median()
    gamma[dims] = ((strength * median) ** 2 - rest).clamp_min(0).sqrt() / massive[artifact].median()


def _massive_dims(model: nn.Module, channels: Channels, g: torch.Generator) -> Tensor:
    """The two residual channels the artifacts are written into: at random, or the two the final norm weighs most
    (where a real model's final features would show them best)."""
    dim = model.embed_dim
    if channels == "random":
        return torch.randperm(dim, generator=g)[:2]
    weight = model.norm.weight.detach().abs().cpu() + 1e-6 * torch.rand(dim, generator=g)  # ties broken at random
    return weight.topk(2).indices


def _gate_cut(score: Tensor, taken: Tensor, share: float, least: float) -> Tensor:
    """The readout level above which a group fires so that, with the tokens already ``taken`` by earlier groups,
    ``share`` of all tokens are artifacts (and at least ``least`` of them are its own new ones)."""
    free = score[~taken]
    new = max(share - taken.float().mean().item(), least) * len(score)
    return torch.quantile(free, max(0.0, 1 - new / max(len(free), 1)))


def plant_artifacts(
    model: nn.Module,
    blocks: int | Sequence[int] | None = None,
    groups: int = 1,
    units: int = 4,
    strength: float = 8.0,
    fraction: float = 0.03,
    position_weight: float = 1.0,
    disturbance: float = 0.05,
    final_norm: bool = False,
    channels: Channels = "random",
    images: Tensor | None = None,
    seed: int = 0,
    silent: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose own MLP units make high-norm artifact tokens in ``blocks``.

    ``blocks``: one block or consecutive blocks whose MLPs make them (default: the block at a third of the depth).
    ``groups``: unit groups per block, each with its own reading of "low-information patch" (a mix of five
    flatness measures) and its own position field, planted in order, each on the output of the earlier ones.
    ``units``: units per group (even: they work in pairs that clamp their output); the plant has
    ``len(blocks) * groups * units`` artifact units. ``strength``: what one group writes, as a multiple of the
    median patch-token norm entering the final norm (a token several groups fire on gets the sum).
    ``fraction``: share of the calibration images' patch tokens that are artifacts after the last group; each
    group adds its share in order, so the fraction grows block by block.
    ``position_weight``: how much the grid position decides where they fire, against the patch's content (0:
    content only; at 1 about half of them stay on the same content when it moves by a patch).
    ``disturbance``: how much the artifacts change the other patch tokens, as 1 - their mean cosine to the twin
    (later blocks read the artifact channels harder or softer to match; a pretrained model may not go below its
    own minimum). ``final_norm``: also raise the final norm's weight on the artifact channels so the tokens
    stand out after it at ``strength`` x the median (else the final norm is left as it is, and the output may not
    show them). ``channels``: the two residual channels they are written into: ``random`` or ``norm`` (the two
    the final norm weighs most). ``images``: normalised calibration images at the model's resolution (default:
    synthetic ones). ``silent``: the same edited model with the artifact units' output off - the artifact-free
    reference. The input model is not modified.
    """
    blocks = _plant_blocks(model, blocks)
    hidden = model.blocks[blocks[0]].mlp.fc1.out_features
    if groups < 1 or units < 2 or units % 2 or groups * units + 2 * _FILTERS > hidden:
        raise RetrofitError(f"need groups >= 1 and an even units >= 2 with groups * units <= {hidden - 2 * _FILTERS} "
                            f"(the MLP has {hidden} units), got groups={groups}, units={units}.")
    if strength <= 1 or not 0 < fraction <= 0.2 or position_weight < 0 or not 0 <= disturbance < 0.5:
        raise RetrofitError(
            f"need strength > 1, 0 < fraction <= 0.2, position_weight >= 0 and 0 <= disturbance < 0.5, got "
            f"{strength}, {fraction}, {position_weight}, {disturbance}."
        )
    if channels not in ("random", "norm"):
        raise RetrofitError(f"channels must be 'random' or 'norm', got {channels!r}.")
    ref = next(model.parameters())
    planted = copy.deepcopy(model).float().eval()  # calibrated where the model lives (GPU for big ones)
    size = tuple(planted.patch_embed.img_size)
    if images is None:
        cfg = data_config(planted)
        images = synthetic_images(32, size[0], seed=seed, mean=cfg["mean"], std=cfg["std"])
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, *size):
        raise RetrofitError(
            f"calibration images must be (N, 3, {size[0]}, {size[1]}) for this model, got {tuple(images.shape)}."
        )
    images = images.float().to(ref.device)
    g = torch.Generator().manual_seed(seed)
    dims = _massive_dims(planted, channels, g).to(ref.device)
    massive = images.new_zeros(planted.embed_dim)
    massive[dims[0]], massive[dims[1]] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    grid = tuple(planted.patch_embed.grid_size)
    plan = [b for b in blocks for _ in range(groups)]  # the gate block of each group, in planting order
    readings = _flatness_readings(images, patch_size(planted)[0])
    fields = [position_field(grid, seed + 1 + i).to(images.device) for i in range(len(plan))]
    mixes = [torch.rand(len(readings), generator=g).to(images.device) for _ in plan]
    targets = [_propensity(readings, mix, field, position_weight) for mix, field in zip(mixes, fields, strict=True)]
    chosen = {b: torch.randperm(hidden, generator=g).tolist() for b in [blocks[0] - 1, *blocks]}
    gates: list[Gate] = []

    with torch.no_grad():
        _silence_writers(planted, dims)
        _even_readers(planted, blocks[0], dims)
        write = strength * _patch_tokens(planted, images, planted.norm).norm(dim=-1).median()  # what a group adds
        out = write * massive * 2 / units
        first = _patch_tokens(planted, images, planted.blocks[blocks[0]].norm2, output=True).flatten(0, 1)
        if _fit_readout(first, targets[0])[2] < _MIN_EXPLAINED:  # e.g. a random init: write texture and position
            _write_propensity(planted, images, plan, dims, fields, position_weight,
                              chosen[blocks[0] - 1][: 2 * _FILTERS], g)
        for i, block in enumerate(plan):
            blk, j = planted.blocks[block], plan[:i].count(block)
            features = _patch_tokens(planted, images, blk.norm2, output=True).flatten(0, 1)
            row, bias, _ = _fit_readout(features, targets[i])
            score = features @ row + bias
            taken = (_patch_tokens(planted, images, blk, output=True).flatten(0, 1) @ massive).abs() > write / 2
            cut = _gate_cut(score, taken, fraction * (i + 1) / len(plan), fraction / (2 * len(plan)))
            # the gate: units in pairs, gelu(z) - gelu(z - 1) ~ clamp(z, 0, 1), z = sharpness * (score - cut) / spread
            scale = _SHARPNESS / score.std()
            pairs = torch.tensor([1.0, -1.0], device=images.device).repeat(units // 2)
            gate_units = chosen[block][2 * _FILTERS + j * units: 2 * _FILTERS + (j + 1) * units]
            _set_units(blk.mlp, gate_units, row.expand(units, -1) * scale, (bias - cut) * scale + (pairs - 1) / 2,
                       pairs[:, None] * out)
            ls = getattr(blk, "ls2", None)
            if hasattr(ls, "gamma"):  # layer scale would shrink what the units write
                ls.gamma[dims] = 1
            gates.append((blk.mlp.fc1, blk.mlp.fc2, torch.tensor(gate_units, device=images.device)))
            if j == groups - 1:  # the block's groups are in: later blocks read them (the next groups included)
                _calibrate_influence(planted, images, block, dims, gates, disturbance)
        if len(blocks) > 1:  # once more over every reader, now that all groups write
            _calibrate_influence(planted, images, blocks[0], dims, gates, disturbance)
        if final_norm:
            planted.norm.bias[dims] = 0
            _calibrate_final_norm(planted, images, dims, strength)
        if silent:
            for _, fc2, gate_units in gates:
                fc2.weight[:, gate_units] = 0
    return planted.to(device=ref.device, dtype=ref.dtype)
