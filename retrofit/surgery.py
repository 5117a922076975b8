"""Register insertion for timm ViTs, with the exact position-embedding conversion.

A model trained with ``no_embed_class=False`` adds ``pos_embed[:, :prefix]`` to its prefix
tokens. Folding that slice into the tokens themselves and rebuilding the model with
``no_embed_class=True`` gives the same function, and leaves the new registers without any
position embedding (docs/method.md, "Surgery").
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Literal

import timm
import torch
from timm.models._input import get_model_args
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import RetrofitError

log = logging.getLogger(__name__)
SUPPORTED_CLASSES: tuple[type[nn.Module], ...] = (VisionTransformer, Eva)
RegisterInit = Literal["randn", "zeros", "cls", "mean_patch", "timm"]
OnExisting = Literal["add", "error"]


def check_supported(model: nn.Module) -> None:
    """Raise a one-line error unless ``model`` is a timm ViT we know how to operate on."""
    if not isinstance(model, SUPPORTED_CLASSES):
        names = ", ".join(f"timm {c.__name__}" for c in SUPPORTED_CLASSES)
        raise RetrofitError(
            f"{type(model).__name__} is not a supported Vision Transformer: retrofit supports {names} "
            "models (e.g. vit_base_patch14_dinov2, vit_base_patch16_clip_224, eva02_base_patch14_224)."
        )
    if not getattr(model, "pretrained_cfg", {}).get("architecture"):
        raise RetrofitError(
            f"this {type(model).__name__} has no pretrained_cfg['architecture']: "
            "build it with timm.create_model(...) or retrofit.load_backbone(...)."
        )


def count_registers(model: nn.Module) -> int:
    """Number of register tokens the model has (0 for none)."""
    reg = getattr(model, "reg_token", None)
    return 0 if reg is None else int(reg.shape[1])


def timm_model(model: nn.Module) -> nn.Module:
    """The timm ViT inside a peft wrapper (LoRA adapters stay active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def _register_kwarg(model: nn.Module) -> str:
    # VisionTransformer calls it reg_tokens, Eva num_reg_tokens.
    return "num_reg_tokens" if isinstance(model, Eva) else "reg_tokens"


def register_slice(model: nn.Module) -> slice:
    """Where the registers sit in the token sequence: right after the class token."""
    start = int(has_class_token(model))
    return slice(start, start + count_registers(model))


def _folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the prefix part of ``pos_embed`` folded into the prefix tokens."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pos = sd.get("pos_embed")
    if model.no_embed_class or pos is None or model.num_prefix_tokens == 0:
        return sd
    npt = model.num_prefix_tokens
    prefix_pos, sd["pos_embed"] = pos[:, :npt], pos[:, npt:].contiguous()
    start = 0
    if has_class_token(model):
        sd["cls_token"] = sd["cls_token"] + prefix_pos[:, :1]
        start = 1
    if count_registers(model):
        sd["reg_token"] = sd["reg_token"] + prefix_pos[:, start:]
    return sd


def _init_registers(
    model: nn.Module, sd: dict[str, torch.Tensor], n: int, init: RegisterInit, generator: torch.Generator | None
) -> torch.Tensor:
    """New register values, shape (1, n, D), computed in float32 from the folded state dict."""
    dim = model.embed_dim
    if init == "randn":
        return torch.randn(1, n, dim, generator=generator) / math.sqrt(dim)
    if init == "timm":  # timm's own register init: near zero, so the model barely changes at step 0
        return torch.randn(1, n, dim, generator=generator) * 1e-6
    if init == "zeros":
        return torch.zeros(1, n, dim)
    if init == "cls":
        if not has_class_token(model):
            raise RetrofitError("init='cls' needs a class token and this model has none: use init='randn'.")
        return sd["cls_token"].float().cpu().expand(1, n, dim).clone()
    if init == "mean_patch":
        # Input-layer token of a mean-valued (all-zero after normalisation) image, averaged over positions: a token
        # like a blank patch joins attention about as a patch does. timm's tiny noise keeps the registers apart.
        # Built where new tensors are made (the CPU, or the meta device when only shapes are wanted).
        noise = torch.randn(1, n, dim, generator=generator) * 1e-6
        bias = getattr(model.patch_embed.proj, "bias", None)
        token = torch.zeros(dim) if bias is None else bias.detach().float().to(noise.device)
        if sd.get("pos_embed") is not None:
            token = token + sd["pos_embed"].float().to(noise.device).mean(dim=(0, 1))
        return token + noise
    raise RetrofitError(f"unknown register init {init!r}: choose one of randn, zeros, cls, mean_patch, timm.")


def add_registers(
    model: nn.Module,
    num_registers: int = 4,
    init: RegisterInit = "randn",
    existing: OnExisting = "add",
    seed: int | None = None,
) -> nn.Module:
    """Return a new model of the same timm class with ``num_registers`` more register tokens.

    The input is never mutated. Dtype, device and train/eval mode are kept. The new model is
    built with ``no_embed_class=True`` after folding the prefix position embedding into the
    class (and old register) tokens, so with the new registers masked out of attention it
    computes exactly what the original did. ``existing='error'`` refuses a model that already
    has registers; ``'add'`` appends the new ones after the old ones.
    """
    check_supported(model)
    if num_registers < 0:
        raise RetrofitError(f"num_registers must be >= 0, got {num_registers}.")
    old = count_registers(model)
    if old and existing == "error":
        raise RetrofitError(
            f"the model already has {old} registers: pass existing='add' to add {num_registers} more."
        )
    if existing not in ("add", "error"):
        raise RetrofitError(f"existing must be 'add' or 'error', got {existing!r}.")
    if old and num_registers:  # stacking is allowed, but never silent
        log.warning("%s already has %d registers: adding %d more, %d in total.",
                    model.pretrained_cfg["architecture"], old, num_registers, old + num_registers)

    ref = next(model.parameters())
    sd = _folded_state_dict(model)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    new_regs = _init_registers(model, sd, num_registers, init, generator)

    # timm's own record of how to rebuild this model as it is now (factory kwargs, current head, pool, size)
    kwargs = get_model_args(model)
    kwargs.update({_register_kwarg(model): old + num_registers, "no_embed_class": True})
    arch = model.pretrained_cfg["architecture"]
    new = timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(model.pretrained_cfg), **kwargs)

    if old + num_registers:
        old_regs = sd.pop("reg_token", None)
        parts = ([old_regs.float().to(new_regs.device)] if old_regs is not None else []) + [new_regs]
        sd["reg_token"] = torch.cat(parts, dim=1)
    result = new.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:  # the rebuild must account for every weight
        raise RetrofitError(
            f"register surgery on {arch} left weights unmatched (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}): please report this architecture."
        )
    return new.to(device=ref.device, dtype=ref.dtype).train(model.training)


def at_input_size(model: nn.Module, img_size: int) -> nn.Module:
    """``model`` built for ``img_size`` px square inputs - the size it was trained at - and able to run at any other.

    timm's ``set_input_size`` resamples the position embedding to the new grid exactly as the dynamic-size
    forward does during training, so the outputs at ``img_size`` are unchanged; the rebuild adds
    ``dynamic_img_size=True`` (VisionTransformer and Eva both take it). timm records both in the model's
    arguments, so config.json makes plain ``timm.create_model`` build the same. A model already built that way
    is returned as it is; otherwise the result is a new model and ``model`` is not changed.
    """
    check_supported(model)
    size = (img_size, img_size)
    if model.dynamic_img_size and tuple(model.patch_embed.img_size) == size:
        return model
    kwargs = {**get_model_args(model), "dynamic_img_size": True}
    arch = model.pretrained_cfg["architecture"]
    new = timm.create_model(arch, pretrained=False, pretrained_cfg=copy.deepcopy(model.pretrained_cfg), **kwargs)
    new.load_state_dict(model.state_dict())
    new.set_input_size(img_size=size)
    ref = next(model.parameters())
    return new.to(device=ref.device, dtype=ref.dtype).train(model.training)


def register_key_mask(model: nn.Module, num_tokens: int, masked: slice) -> torch.Tensor:
    """Boolean attention mask (True = may attend) that hides the tokens in ``masked`` from every query.

    Used to check the conversion is exact: with the new registers hidden, outputs equal the original.
    """
    mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool)
    mask[:, masked] = False
    return mask
