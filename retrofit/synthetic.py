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
_SHARPNESS = 20.0  # the gate goes from off to full output over 1/_SHARPNESS of its readout's std
_FILTERS = 2  # zero-mean texture filters behind the energy written into models that lack it
_RIDGE = 0.1  # readout ridge penalty, as a fraction of the mean feature variance
_MIN_EXPLAINED = 0.5  # readout R^2 below which the model is first given texture and position features
_UNITS = 4  # artifact units (pairs that clamp their output)


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


def _plant_block(model: nn.Module, block: int | None) -> int:
    """The block to plant in (default: a third of the depth), after checking the model can take the circuit."""
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
    block = max(1, depth // 3) if block is None else block
    if not 1 <= block < depth:
        raise RetrofitError(f"block must be in 1..{depth - 1} for this {depth}-block model, got {block}.")
    return block


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


def _propensity(images: Tensor, patch: int, grid: tuple[int, int], seed: int, position_weight: float) -> Tensor:
    """Where artifacts should form, per patch token (B * N,): standardised flatness + ``position_weight`` x field."""
    cells = F.unfold(images.float(), patch, stride=patch)  # (B, C * p * p, N)
    spread = cells.unflatten(1, (images.shape[1], -1)).std(dim=2).mean(dim=1)  # per-channel pixel std, (B, N)
    flat = -torch.log(spread + 1e-2).flatten()
    flat = (flat - flat.mean()) / flat.std().clamp_min(1e-6)
    return flat + position_weight * position_field(grid, seed).to(images.device).repeat(len(images))


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


def _write_propensity(planted: nn.Module, images: Tensor, block: int, dims: Tensor, position_weight: float,
                      units: list[int], seed: int, g: torch.Generator) -> None:
    """Give a model whose features do not carry patch texture and grid position (a random init) both, along
    quiet directions: texture energy from block ``block - 1`` and a field in the position embedding."""
    dim = planted.embed_dim
    avoid = torch.cat([torch.eye(dim, device=images.device)[dims], _flat_responses(planted.patch_embed.proj)])
    u = _quiet_directions(_patch_tokens(planted, images, planted.blocks[block - 1].norm2).flatten(0, 1),
                          _FILTERS, avoid, g)
    w = _quiet_directions(_patch_tokens(planted, images, planted.blocks[block].norm2).flatten(0, 1),
                          1, torch.cat([avoid, u]), g)[0]
    own = _texture_energy(planted, images, block, u, w, units, g)
    field = position_field(tuple(planted.patch_embed.grid_size), seed).to(images.device)
    _position_bias(planted, images, block, w, field, position_weight * _GATE * own.std())


def _calibrate_influence(planted: nn.Module, images: Tensor, block: int, dims: Tensor, units: list[int],
                         disturbance: float) -> None:
    """Scale how strongly the blocks after ``block`` read an artifact, so that the other patch tokens' mean
    cosine to the artifact-free twin is ``1 - disturbance``.

    Their norms get the same weight and bias on both ``dims``, so a token that carries nothing there (every
    token the artifact units leave alone) reads only the mean of the two weight columns; an artifact,
    ``+x`` on one and ``-x`` on the other, reads their half-difference, which is what gets scaled.
    """
    readers = []
    for blk in planted.blocks[block + 1:]:
        for norm, reader in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
            norm.weight[dims] = norm.weight[dims].abs().mean()
            if norm.bias is not None:
                norm.bias[dims] = norm.bias[dims].mean()
            first, second = reader.weight[:, dims[0]].clone(), reader.weight[:, dims[1]].clone()
            readers.append((reader, (first + second) / 2, (first - second) / 2))
    fc2 = planted.blocks[block].mlp.fc2
    written = fc2.weight[:, units].clone()
    fc2.weight[:, units] = 0
    twin = _patch_tokens(planted, images, planted.norm, output=True)
    fc2.weight[:, units] = written
    others = _artifact_direction(planted, images, dims).abs() < 1

    def excess(log_gain: float) -> float:
        for reader, common, half in readers:
            reader.weight[:, dims[0]] = common + math.exp(log_gain) * half
            reader.weight[:, dims[1]] = common - math.exp(log_gain) * half
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


def plant_artifacts(
    model: nn.Module,
    block: int | None = None,
    strength: float = 8.0,
    fraction: float = 0.03,
    position_weight: float = 1.0,
    disturbance: float = 0.05,
    images: Tensor | None = None,
    seed: int = 0,
    silent: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose own MLP units in ``block`` make high-norm artifact tokens.

    ``block``: the block whose MLP makes them, the first whose output has artifacts (default: a third
    of the depth). ``strength``: artifact norm / median patch norm after the final norm.
    ``fraction``: share of the calibration images' patch tokens that become artifacts.
    ``position_weight``: how much the grid position decides where they fire, against the patch's texture
    (0: content only; at 1 about half of them stay on the same content when it moves by a patch).
    ``disturbance``: how much the artifacts change the other patch tokens, as 1 - their mean cosine to
    the twin (later blocks read the artifact direction harder or softer to match; a pretrained model may
    not go below its own minimum). ``images``: normalised calibration images at the model's resolution
    (default: synthetic ones). ``silent``: the same edited model with the artifact units' output off - the
    artifact-free reference. The input model is not modified.
    """
    block = _plant_block(model, block)
    if strength <= 1 or not 0 < fraction <= 0.2 or position_weight < 0 or not 0 <= disturbance < 0.5:
        raise RetrofitError(
            f"need strength > 1, 0 < fraction <= 0.2, position_weight >= 0 and 0 <= disturbance < 0.5, got "
            f"{strength}, {fraction}, {position_weight}, {disturbance}."
        )
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
    dim, mlp = planted.embed_dim, planted.blocks[block].mlp
    dims = torch.randperm(dim, generator=g)[:2]
    hidden = torch.randperm(mlp.fc1.out_features, generator=g)
    texture_units, gate_units = hidden[: 2 * _FILTERS].tolist(), hidden[2 * _FILTERS: 2 * _FILTERS + _UNITS].tolist()
    massive = images.new_zeros(dim)
    massive[dims[0]], massive[dims[1]] = 1 / math.sqrt(2), -1 / math.sqrt(2)

    with torch.no_grad():
        _silence_writers(planted, dims)
        gate_norm, grid = planted.blocks[block].norm2, tuple(planted.patch_embed.grid_size)
        target = _propensity(images, patch_size(planted)[0], grid, seed, position_weight)
        features = _patch_tokens(planted, images, gate_norm, output=True).flatten(0, 1)
        row, bias, explained = _fit_readout(features, target)
        if explained < _MIN_EXPLAINED:  # e.g. a random init: write texture and position in, then read them
            _write_propensity(planted, images, block, dims, position_weight, texture_units, seed, g)
            features = _patch_tokens(planted, images, gate_norm, output=True).flatten(0, 1)
            row, bias, explained = _fit_readout(features, target)
        # the gate: units in pairs, gelu(z) - gelu(z - 1) ~ clamp(z, 0, 1), z = sharpness * (score - cut) / spread
        score = features @ row + bias
        spread = score.std()
        cut = torch.quantile(score, 1 - fraction)
        scale = _SHARPNESS / spread
        residual = _patch_tokens(planted, images, planted.norm)
        out = strength * residual.norm(dim=-1).median() * massive * 2 / _UNITS
        pairs = torch.tensor([1.0, -1.0], device=images.device).repeat(_UNITS // 2)
        _set_units(mlp, gate_units, row.expand(_UNITS, -1) * scale, (bias - cut) * scale + (pairs - 1) / 2,
                   pairs[:, None] * out)
        ls = getattr(planted.blocks[block], "ls2", None)
        if hasattr(ls, "gamma"):  # layer scale would shrink what the units write
            ls.gamma[dims] = 1
        _calibrate_influence(planted, images, block, dims, gate_units, disturbance)
        planted.norm.bias[dims] = 0
        _calibrate_final_norm(planted, images, dims, strength)
        if silent:
            mlp.fc2.weight[:, gate_units] = 0
    return planted.to(device=ref.device, dtype=ref.dtype)
