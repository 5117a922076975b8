"""Register neurons and training-free test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need
Trained Registers").

MLP units in middle blocks make a ViT's high-norm artifacts: they fire hard at the artifact positions and almost
nowhere else, and write the artifacts' large vector into the residual stream. :func:`find_register_neurons`
finds the blocks where the artifacts build and keeps every unit there that fires at the artifact tokens and
writes along them; :func:`test_time_registers` appends extra tokens
and, at the chosen units, moves each image's largest activation from the patch tokens onto them, so the
artifacts never form - no training, no weight change.

Both work on timm ``VisionTransformer`` and ``Eva`` (SwiGLU included) through hooks on timm's own modules:
the unit activations are the input of each block's ``mlp.fc2``, whatever the MLP type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import RetrofitError
from .files import write_json
from .residual import ResidualProfile, forwards, residual_profile
from .surgery import check_supported


@dataclass
class RegisterNeurons:
    """Where a model's artifacts are made and the MLP units that make them, with the numbers they were chosen by
    (JSON-able: what ``retrofit neurons`` writes and a training checkpoint keeps)."""

    units: dict[int, list[int]]
    """Block index -> unit indices (hidden units of that block's MLP, the input of ``mlp.fc2``)."""
    scores: dict[int, list[float]] = field(default_factory=dict)
    """What each chosen unit writes along the artifact tokens' own direction, as a share of their norm above the
    image median (pairs of units that cancel each other each score above 1), same order as ``units``."""
    lift: dict[int, list[float]] = field(default_factory=dict)
    """Each chosen unit's mean |activation| at the artifact tokens over that elsewhere."""
    alignment: dict[int, list[float]] = field(default_factory=dict)
    """How much of what each chosen unit writes at the artifact tokens lies along their direction (1: all of it;
    a unit writing in an unrelated direction scores about 1 / sqrt(width))."""
    sparsity: dict[int, list[float]] = field(default_factory=dict)
    """Share of all patch tokens on which each chosen unit stays below ``sparse_below``."""
    profile: ResidualProfile | None = None
    """How the artifacts build in the residual stream (per block), and the blocks where they build."""
    outlier_fraction: float = 0.0
    """High-norm outlier fraction of the residual stream at the profile's peak block (the artifact tokens)."""
    images: list[str] = field(default_factory=list)
    """The images they were found on (keys or names; their number is what decided)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How they were found (k, min_lift, min_share, sparsity cut, max_units)."""

    @property
    def count(self) -> int:
        return sum(len(u) for u in self.units.values())

    @property
    def blocks(self) -> list[int]:
        """The blocks where the artifacts build, first to last (empty: none found)."""
        return [] if self.profile is None else self.profile.blocks

    def describe(self) -> str:
        """One phrase for run lines and reports: where the artifacts build and how many units make them."""
        if not self.blocks:
            return "no artifacts"
        return f"artifacts build in {self.profile.describe()}, {self.count} register neurons"

    def rows(self) -> list[tuple[int, int, float, float, float, float]]:
        """(block, unit, score, lift, alignment, sparsity) for every chosen unit, highest score first."""
        rows = [(b, u, *numbers) for b in self.units
                for u, *numbers in zip(self.units[b], self.scores.get(b, []), self.lift.get(b, []),
                                       self.alignment.get(b, []), self.sparsity.get(b, []), strict=True)]
        return sorted(rows, key=lambda r: -r[2])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegisterNeurons:
        """Inverse of :meth:`to_dict`, also after a JSON round trip (block keys become strings there)."""
        keyed = {name: {int(b): v for b, v in data.get(name, {}).items()}
                 for name in ("units", "scores", "lift", "alignment", "sparsity")}
        profile = data.get("profile")
        return cls(**{**data, **keyed, "profile": None if profile is None else ResidualProfile(**profile)})

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
def _recording(modules: Sequence[nn.Module], output: bool = False) -> Iterator[list[Tensor | None]]:
    """The input (or with ``output``, the output) of each module in the last forward (slot i for module i)."""
    seen: list[Tensor | None] = [None] * len(modules)

    def hook(i: int) -> Any:
        if output:
            return lambda _m, _args, out: seen.__setitem__(i, out.detach())
        return lambda _m, args: seen.__setitem__(i, args[0].detach())

    handles = [m.register_forward_hook(hook(i)) if output else m.register_forward_pre_hook(hook(i))
               for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _unit_writes(block: nn.Module) -> Tensor:
    """(D, units): what each MLP unit adds to the residual stream per unit of activation (fc2's column, times the
    block's layer scale where it has one)."""
    weight = block.mlp.fc2.weight.detach().float()
    scale = getattr(getattr(block, "ls2", None), "gamma", None)
    if scale is None:
        scale = getattr(block, "gamma_2", None)  # Eva's layer scale
    return weight if scale is None else weight * scale.detach().float()[:, None]


class _UnitStats:
    """Per-unit sums over patch tokens for the blocks searched: |activation| at the artifact tokens and
    elsewhere, quiet tokens, and the signed write along each artifact token's own direction."""

    def __init__(self, model: nn.Module, blocks: list[int], sparse_below: float) -> None:
        units = model.blocks[blocks[0]].mlp.fc2.in_features
        self.blocks, self.sparse_below = blocks, sparse_below
        self.at, self.everywhere, self.quiet, self.write = (torch.zeros(len(blocks), units, dtype=torch.float64)
                                                           for _ in range(4))
        self.writes = [_unit_writes(model.blocks[b]) for b in blocks]
        self.artifacts = self.tokens = 0
        self.excess = 0.0  # summed norm above the image median of the artifact tokens at the peak block

    def add(self, acts: list[Tensor], mask: Tensor, peak: Tensor) -> None:
        """One batch: patch-token activations per searched block (B, N, units), the artifact tokens (B, N) and the
        patch tokens at the peak block (B, N, D), whose artifacts give each its direction and its excess norm."""
        norms = peak.float().norm(dim=-1)
        self.excess += (norms - norms.median(dim=1, keepdim=True).values)[mask].sum().item()
        directions = F.normalize(peak[mask].float(), dim=-1)
        for i, (a, write) in enumerate(zip(acts, self.writes, strict=True)):
            a = a.float()
            at = a[mask]  # (artifacts, units)
            self.at[i] += at.abs().sum(0).double().cpu()
            self.everywhere[i] += a.abs().sum(dim=(0, 1)).double().cpu()
            self.quiet[i] += (a.abs() < self.sparse_below).sum(dim=(0, 1)).double().cpu()
            self.write[i] += (at * (directions @ write.to(a.device))).sum(0).double().cpu()
        self.artifacts += int(mask.sum())
        self.tokens += mask.numel()


def find_register_neurons(
    model: nn.Module,
    images: Tensor,
    k: float = 3.0,
    min_lift: float = 2.0,
    min_share: float = 0.002,
    min_alignment: float = 0.3,
    sparse_below: float = 0.5,
    min_sparsity: float = 0.5,
    max_units: int = 64,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> RegisterNeurons:
    """Where ``model``'s artifacts are made and the MLP units that make them, found on normalised ``images``
    (N, 3, H, W); 32 or more give a stable answer, one batch of 8 may hold too few artifacts.

    The residual stream gives the blocks where the artifacts build (:func:`retrofit.residual.residual_profile`)
    and the artifact tokens (its high-norm outliers). Every MLP unit of those blocks is kept if it passes four
    tests, each on its own terms and none a count: it fires at the artifact tokens at least ``min_lift`` x as hard
    as elsewhere (mean |activation|); it is quiet (below ``sparse_below``) on at least ``min_sparsity`` of all patch
    tokens; what it writes along each artifact token's own direction is at least ``min_share`` of the artifacts'
    norm above their image median; and at least ``min_alignment`` of what it writes there lies along that
    direction. The last two tell the units that make the artifacts from units that only respond to them - to the
    flat patches they sit on, or to the artifact itself in a later block - and write elsewhere (about
    1 / sqrt(width) of a write lies along any one direction by chance). ``max_units`` per block is only a guard
    against a degenerate model: DINOv2-L has about 45 register neurons per block, our largest synthetic plants 32;
    the highest scores are kept. ``names`` label the images in the record. ``progress`` shows rich progress bars.
    """
    check_supported(model)
    if images.ndim != 4 or not len(images):
        raise RetrofitError(f"images must be a non-empty (N, 3, H, W) tensor, got shape {tuple(images.shape)}.")
    if max_units < 1 or min_lift < 1 or min_share < 0:
        raise RetrofitError(f"need max_units >= 1, min_lift >= 1 and min_share >= 0, got {max_units}, {min_lift}, "
                            f"{min_share}.")
    if not 0 <= min_sparsity <= 1:
        raise RetrofitError(f"min_sparsity must be in 0..1 (a fraction of the patch tokens), got {min_sparsity}.")
    fc2s = _mlp_inputs(model)
    profile, artifacts = residual_profile(model, images, k, batch_size=batch_size, progress=progress)
    found = RegisterNeurons(
        units={}, profile=profile, outlier_fraction=artifacts.float().mean().item(),
        images=[str(n) for n in names] if names is not None else [f"image{i}" for i in range(len(images))],
        settings={"k": k, "min_lift": min_lift, "min_share": min_share, "min_alignment": min_alignment,
                  "sparse_below": sparse_below,
                  "min_sparsity": min_sparsity, "max_units": max_units},
    )
    if not profile.blocks:
        return found
    stats, npt, current = _UnitStats(model, profile.blocks, sparse_below), model.num_prefix_tokens, {}
    with _recording([fc2s[b] for b in profile.blocks]) as seen, \
            _recording([model.blocks[profile.peak]], output=True) as peak:
        for _ in forwards(model, images, batch_size, "ranking MLP units", progress,
                              before=lambda batch: current.__setitem__("mask", artifacts[batch])):
            stats.add([a[:, npt:] for a in seen], current["mask"].to(peak[0].device), peak[0][:, npt:])
    at = stats.at / max(stats.artifacts, 1)
    lift = at / ((stats.everywhere - stats.at) / max(stats.tokens - stats.artifacts, 1)).clamp_min(1e-6)
    sparsity = stats.quiet / stats.tokens
    share = (stats.write / max(stats.artifacts, 1)).abs() / max(stats.excess / max(stats.artifacts, 1), 1e-12)
    alignment = stats.write.abs() / (stats.at * torch.stack([w.norm(dim=0) for w in stats.writes]).double().cpu())
    keep = (lift >= min_lift) & (sparsity >= min_sparsity) & (share >= min_share) & (alignment >= min_alignment)
    for i, block in enumerate(profile.blocks):
        chosen = torch.where(keep[i], share[i], torch.full_like(share[i], -1.0)).topk(min(max_units, keep.shape[1]))
        units = [u for u, s in zip(chosen.indices.tolist(), chosen.values.tolist(), strict=True) if s >= 0]
        if units:
            found.units[block] = units
            found.scores[block] = share[i, units].tolist()
            found.lift[block] = lift[i, units].tolist()
            found.alignment[block] = alignment[i, units].tolist()
            found.sparsity[block] = sparsity[i, units].tolist()
    return found


def _unit_index(units: list[int]) -> Callable[[torch.device], Tensor]:
    """The unit indices as a tensor on a given device, made once per device (hooks run on every forward)."""
    made: dict[torch.device, Tensor] = {}

    def on(device: torch.device) -> Tensor:
        if device not in made:
            made[device] = torch.tensor(units, device=device)
        return made[device]

    return on


def _move_to_registers(units: list[int], prefix: int, count: int):
    """fc2 pre-hook: zero the units on the patch tokens and give each register the image's largest-magnitude value."""
    index = _unit_index(units)

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h = args[0].clone()
        idx = index(h.device)
        patches = h[:, prefix + count:, idx]  # (B, N, U)
        peak = patches.gather(1, patches.abs().argmax(dim=1, keepdim=True))  # (B, 1, U)
        h[:, prefix:prefix + count, idx] = peak.expand(-1, count, -1)
        h[:, prefix + count:, idx] = 0
        return (h, *args[1:])

    return hook


def _silence(units: list[int]):
    """fc2 pre-hook: the units' activations are 0 on every token."""
    index = _unit_index(units)

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h = args[0].clone()
        h[..., index(h.device)] = 0
        return (h, *args[1:])

    return hook


@contextmanager
def silenced(model: nn.Module, neurons: RegisterNeurons) -> Iterator[nn.Module]:
    """``model`` with the register neurons switched off on every token: the artifacts they make never form, nor
    what they write into the other tokens through attention. No token takes their activations over (unlike
    :func:`test_time_registers`), so nothing new joins attention. On exit the model is exactly as it was."""
    fc2s = _mlp_inputs(model)
    _check_blocks(neurons, len(fc2s))
    with ExitStack() as stack:
        for b, units in neurons.units.items():
            if units:
                stack.callback(fc2s[b].register_forward_pre_hook(_silence(units)).remove)
        yield model


def _check_blocks(neurons: RegisterNeurons, depth: int) -> None:
    bad = [b for b in neurons.units if not 0 <= b < depth]
    if bad:
        raise RetrofitError(f"register neurons name block {bad[0]}, but the model has blocks 0..{depth - 1}: "
                            "find them on this model.")


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
    _check_blocks(neurons, len(fc2s))
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
