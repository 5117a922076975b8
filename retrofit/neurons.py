"""Register neurons and training-free test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need
Trained Registers").

A few MLP units in middle blocks make a ViT's high-norm artifacts: they fire hard at the artifact positions
and almost nowhere else. :func:`find_register_neurons` ranks every block's MLP units by their mean
|activation| at the high-norm outlier tokens of the output; :func:`test_time_registers` appends extra tokens
and, at the chosen units, moves each image's largest activation from the patch tokens onto them, so the
artifacts never form - no training, no weight change.

Both work on timm ``VisionTransformer`` and ``Eva`` (SwiGLU included) through hooks on timm's own modules:
the unit activations are the input of each block's ``mlp.fc2``, whatever the MLP type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RetrofitError
from .features import block_indices, patch_features
from .files import write_json
from .metrics import artifact_onset, outlier_mask
from .progress import track
from .surgery import check_supported


@dataclass
class RegisterNeurons:
    """Chosen MLP units per block, with the numbers they were chosen by (JSON-able)."""

    units: dict[int, list[int]]
    """Block index -> unit indices (hidden units of that block's MLP, the input of ``mlp.fc2``)."""
    scores: dict[int, list[float]] = field(default_factory=dict)
    """Mean |activation| of each chosen unit at the outlier tokens, same order as ``units``."""
    sparsity: dict[int, list[float]] = field(default_factory=dict)
    """Share of all patch tokens on which each chosen unit stays below ``sparse_below``."""
    onset: int | None = None
    """First block whose output holds artifacts (None: none found)."""
    outlier_fraction: float = 0.0
    """High-norm outlier fraction of the output patch tokens the units were ranked on."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How they were found (k, top_k, sparsity cut, blocks searched, images)."""

    @property
    def count(self) -> int:
        return sum(len(u) for u in self.units.values())

    def rows(self) -> list[tuple[int, int, float, float]]:
        """(block, unit, score, sparsity) for every chosen unit, highest score first."""
        rows = [(b, u, s, p) for b in self.units
                for u, s, p in zip(self.units[b], self.scores.get(b, []), self.sparsity.get(b, []), strict=True)]
        return sorted(rows, key=lambda r: -r[2])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegisterNeurons:
        """Inverse of :meth:`to_dict`, also after a JSON round trip (block keys become strings there)."""
        keyed = {name: {int(b): v for b, v in data.get(name, {}).items()} for name in ("units", "scores", "sparsity")}
        return cls(**{**data, **keyed})

    def save(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> RegisterNeurons:
        """Read a file written by :meth:`save` (``retrofit neurons --out``)."""
        if not Path(path).is_file():
            raise RetrofitError(f"register-neuron file {path} does not exist: write one with "
                                "`retrofit neurons MODEL --images DIR --out FILE`.")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise RetrofitError(f"{path} is not a register-neuron file ({type(e).__name__}): write one with "
                                "`retrofit neurons MODEL --images DIR --out FILE`.") from e


def _mlp_inputs(model: nn.Module) -> list[nn.Module]:
    """Each block's ``mlp.fc2``: its input is the block's unit activations, for Mlp, GluMlp and SwiGLU alike."""
    layers = [getattr(getattr(blk, "mlp", None), "fc2", None) for blk in model.blocks]
    if any(not isinstance(fc2, nn.Linear) for fc2 in layers):
        raise RetrofitError(f"{type(model).__name__} blocks have no mlp.fc2 linear layer: register neurons need timm "
                            "VisionTransformer or Eva blocks.")
    return layers


@contextmanager
def _recording(modules: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """The input of each module in the last forward (slot i for module i)."""
    seen: list[Tensor | None] = [None] * len(modules)
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].detach()))
               for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def find_register_neurons(
    model: nn.Module,
    images: Tensor,
    k: float = 3.0,
    top_k: int = 10,
    max_block: int | None = None,
    sparse_below: float = 0.5,
    min_sparsity: float = 0.5,
    min_lift: float = 10.0,
    batch_size: int = 8,
    progress: bool = False,
) -> RegisterNeurons:
    """The MLP units that make ``model``'s high-norm artifacts, found on normalised ``images`` (N, 3, H, W).

    Every unit of every block up to ``max_block`` (default: the onset block, where the artifacts first
    appear) is scored by its mean |activation| over the patch tokens that are high-norm outliers of the
    output (``k`` x the image median, the project's one definition). Units that are not sparse - below
    ``sparse_below`` on fewer than ``min_sparsity`` of all patch tokens - or whose score is less than
    ``min_lift`` x their mean |activation| on the other patch tokens are dropped (a unit busy everywhere is
    doing the model's ordinary work); the ``top_k`` highest-scoring remain. Any batch size gives the same
    result. ``progress`` shows a rich progress bar.
    """
    check_supported(model)
    if images.ndim != 4 or not len(images):
        raise RetrofitError(f"images must be a non-empty (N, 3, H, W) tensor, got shape {tuple(images.shape)}.")
    if top_k < 1:
        raise RetrofitError(f"top_k must be >= 1 (the most units to keep), got {top_k}.")
    if not 0 <= min_sparsity <= 1:
        raise RetrofitError(f"min_sparsity must be in 0..1 (a fraction of the patch tokens), got {min_sparsity}.")
    fc2s, npt = _mlp_inputs(model), model.num_prefix_tokens
    depth = len(fc2s)
    total = torch.zeros(depth, fc2s[0].in_features, dtype=torch.float64)
    everywhere, quiet = torch.zeros_like(total), torch.zeros_like(total)
    outliers = tokens = 0
    layer_outliers = torch.zeros(depth, dtype=torch.float64)
    device = next(model.parameters()).device
    with torch.no_grad(), _recording(fc2s) as seen:
        for start in track(range(0, len(images), batch_size), "ranking MLP units", progress):
            batch = images[start:start + batch_size].to(device)
            grids = patch_features(model, batch, layers=list(range(depth)))
            mask = outlier_mask(grids[-1], k).flatten(1)  # (B, N) output outliers
            layer_outliers += torch.stack([outlier_mask(g, k).sum() for g in grids]).double().cpu()
            for b, acts in enumerate(seen):
                acts = acts[:, npt:].abs()  # (B, N, units), patch tokens only
                total[b] += acts[mask].double().sum(0).cpu()
                everywhere[b] += acts.double().sum(dim=(0, 1)).cpu()
                quiet[b] += (acts < sparse_below).double().sum(dim=(0, 1)).cpu()
            outliers += int(mask.sum())
            tokens += mask.numel()
    fractions = (layer_outliers / tokens).tolist()
    onset = artifact_onset(fractions)
    last = block_indices(model, [max_block])[0] if max_block is not None else onset
    found = RegisterNeurons(units={}, onset=onset, outlier_fraction=outliers / tokens, settings={
        "k": k, "top_k": top_k, "max_block": last, "sparse_below": sparse_below, "min_sparsity": min_sparsity,
        "min_lift": min_lift,
        "images": len(images),
    })
    if last is None or outliers == 0:
        return found
    scores, sparsity = total[: last + 1] / outliers, quiet[: last + 1] / tokens
    elsewhere = (everywhere - total)[: last + 1] / max(tokens - outliers, 1)
    lift = scores / elsewhere.clamp_min(1e-6)  # how much harder a unit fires at the artifacts than elsewhere
    scores = torch.where((sparsity >= min_sparsity) & (lift >= min_lift), scores, torch.full_like(scores, -1.0))
    best = scores.flatten().topk(min(top_k, scores.numel()))
    for flat, score in zip(best.indices.tolist(), best.values.tolist(), strict=True):
        if score <= 0:
            break
        b, u = divmod(flat, scores.shape[1])
        found.units.setdefault(b, []).append(u)
        found.scores.setdefault(b, []).append(score)
        found.sparsity.setdefault(b, []).append(sparsity[b, u].item())
    found.units = dict(sorted(found.units.items()))
    return found


def _move_to_registers(units: list[int], prefix: int, count: int):
    """fc2 pre-hook: zero the units on the patch tokens and give each register the image's largest-magnitude value."""
    index: dict[torch.device, Tensor] = {}  # the unit indices on each device they are used on, made once

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h = args[0].clone()
        if h.device not in index:
            index[h.device] = torch.tensor(units, device=h.device)
        idx = index[h.device]
        patches = h[:, prefix + count:, idx]  # (B, N, U)
        peak = patches.gather(1, patches.abs().argmax(dim=1, keepdim=True))  # (B, 1, U)
        h[:, prefix:prefix + count, idx] = peak.expand(-1, count, -1)
        h[:, prefix + count:, idx] = 0
        return (h, *args[1:])

    return hook


def _hide_keys(start: int, stop: int):
    """attn pre-hook (with kwargs): no query attends to tokens start..stop-1 (empty register slots)."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        x = args[0] if args else kwargs["x"]
        visible = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        visible[start:stop] = False
        mask = kwargs.get("attn_mask")
        if mask is None:
            mask = visible.view(1, 1, 1, -1)
        elif mask.dtype == torch.bool:
            mask = mask & visible
        else:
            mask = mask.masked_fill(~visible, float("-inf"))
        return args, {**kwargs, "attn_mask": mask}

    return hook


@contextmanager
def test_time_registers(model: nn.Module, neurons: RegisterNeurons, num_registers: int = 1) -> Iterator[nn.Module]:
    """``model`` with ``num_registers`` extra tokens that take over the register neurons' activations.

    Inside the block, every forward of ``model`` appends the tokens (zeros, no position embedding) after
    the class and register tokens; at each chosen unit, the patch tokens' activation is set to 0 and the
    new tokens get the image's largest-magnitude one (TTR). The tokens join attention from the first block
    with chosen units on, so with no units the model computes exactly what it did. ``num_prefix_tokens``
    counts them meanwhile, so :func:`retrofit.patch_features`, diagnose, the metrics, the maps and
    evaluation all work on the model as usual. On exit the model is exactly as it was.
    """
    check_supported(model)
    if num_registers < 1:
        raise RetrofitError(f"num_registers must be >= 1, got {num_registers}.")
    fc2s = _mlp_inputs(model)
    bad = [b for b in neurons.units if not 0 <= b < len(fc2s)]
    if bad:
        raise RetrofitError(f"register neurons name block {bad[0]}, but the model has blocks 0..{len(fc2s) - 1}: "
                            "find them on this model.")
    prefix, count = model.num_prefix_tokens, num_registers
    original, own_method = model._pos_embed, "_pos_embed" in vars(model)  # the latter when contexts nest
    first = min((b for b, u in neurons.units.items() if u), default=len(fc2s))

    def pos_embed_with_registers(x: Tensor) -> Any:
        model.num_prefix_tokens = prefix  # timm's own resampling counts the original prefix
        try:
            out = original(x)
        finally:
            model.num_prefix_tokens = prefix + count
        tokens = out[0] if isinstance(out, tuple) else out
        slots = tokens.new_zeros(tokens.shape[0], count, tokens.shape[2])
        tokens = torch.cat([tokens[:, :prefix], slots, tokens[:, prefix:]], dim=1)
        return (tokens, *out[1:]) if isinstance(out, tuple) else tokens

    counted = [m for m in model.modules() if m is not model and isinstance(getattr(m, "num_prefix_tokens", None), int)]
    with ExitStack() as stack:
        model._pos_embed = pos_embed_with_registers
        model.num_prefix_tokens = prefix + count
        for m in counted:
            m.num_prefix_tokens += count
        stack.callback(_restore, model, prefix, counted, count, original if own_method else None)
        for b, units in neurons.units.items():
            if units:
                stack.callback(fc2s[b].register_forward_pre_hook(_move_to_registers(units, prefix, count)).remove)
        hide = _hide_keys(prefix, prefix + count)
        for blk in model.blocks[:first]:
            stack.callback(blk.attn.register_forward_pre_hook(hide, with_kwargs=True).remove)
        yield model


def _restore(model: nn.Module, prefix: int, counted: list[nn.Module], count: int, outer: Any) -> None:
    if outer is None:
        del model._pos_embed  # the class's own method again
    else:
        model._pos_embed = outer
    model.num_prefix_tokens = prefix
    for m in counted:
        m.num_prefix_tokens -= count
