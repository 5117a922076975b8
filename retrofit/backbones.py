"""load_backbone: a timm name, a timm name plus a local checkpoint, or a retrofit export directory."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .errors import RetrofitError, first_line
from .export import is_export_dir, load
from .surgery import check_supported

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
LOCAL_WEIGHTS_FLAGS = "checkpoint=PATH in Python, --model.checkpoint PATH in retrofit fit, --checkpoint PATH elsewhere"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file without running any code in it (safetensors or weights-only pickle)."""
    path = Path(path)
    if not path.is_file():
        raise RetrofitError(f"checkpoint {path} does not exist: check the path.")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise RetrofitError(
            f"checkpoint {path.name} has an unknown suffix: use one of {', '.join(CHECKPOINT_SUFFIXES)}."
        )
    try:
        if path.suffix == ".safetensors":
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means the file is unusable; say so in one line
        raise RetrofitError(
            f"checkpoint {path} is corrupt or not a weights file ({first_line(e)}): re-download it."
        ) from e
    for key in ("state_dict", "model", "module", "teacher"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RetrofitError(f"checkpoint {path} holds no plain state dict of tensors: save model.state_dict().")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}


def _filter_fn(model: nn.Module):
    """timm's own key converter for the model's family (DINOv2, OpenAI CLIP, HF layouts, ...)."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into ``model`` in place, converting foreign key layouts through timm."""
    sd = read_state_dict(path)
    filter_fn = _filter_fn(model)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise RetrofitError(
                f"checkpoint {Path(path).name} does not fit {model.pretrained_cfg['architecture']} "
                f"({type(e).__name__}: {first_line(e, 120)}): pass the model name these weights were trained with."
            ) from e
    own = model.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if mismatched or missing or unexpected:
        detail = "; ".join(
            f"{label} {keys[:3]}" for label, keys in
            (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)) if keys
        )
        raise RetrofitError(
            f"checkpoint {Path(path).name} does not fit {model.pretrained_cfg['architecture']} ({detail}): "
            "pass the model name these weights were trained with."
        )
    model.load_state_dict(sd)
    return model


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models('*vit*')."
    raise RetrofitError(f"unknown model {name!r}: not a timm model name, local checkpoint or export directory.{hint}")


def load_backbone(
    spec: str | Path,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """Build the ViT to retrofit, in eval mode.

    ``spec`` is a timm model name (hub weights are downloaded when online), ``hf-hub:``/``local-dir:``
    names, or a directory written by :func:`retrofit.export`. With ``checkpoint`` the name only
    picks the architecture and the weights come from that local file (``.safetensors``, ``.pth``,
    ``.bin``; DINOv2, OpenAI CLIP and HF key layouts are converted by timm's filter functions).
    ``pretrained=False`` gives a timm name's bare architecture (no download, no checkpoint), e.g. to
    rebuild a model whose weights come from elsewhere. ``model_kwargs`` go to ``timm.create_model``
    (e.g. ``img_size``, ``dynamic_img_size``).
    """
    spec = str(spec)
    if is_export_dir(spec):
        return load(spec, **model_kwargs)
    if Path(spec).suffix in CHECKPOINT_SUFFIXES or Path(spec).is_dir():
        raise RetrofitError(
            f"{spec} is a file or folder, not a model name: pass the timm name and the file as checkpoint "
            f"({LOCAL_WEIGHTS_FLAGS}), or a directory written by retrofit export."
        )
    _check_name(spec)
    # Build the architecture first so an unsupported class fails before any download.
    model = timm.create_model(spec, pretrained=False, **model_kwargs)
    check_supported(model)
    if not pretrained:
        return model.eval()
    if checkpoint is not None:
        return load_checkpoint(model, checkpoint).eval()
    try:
        return timm.create_model(spec, pretrained=True, **model_kwargs).eval()
    except Exception as e:
        where = ("HF_HUB_OFFLINE is set and they are not in the local cache" if huggingface_hub.constants.HF_HUB_OFFLINE
                 else f"{type(e).__name__}; offline, set HF_HUB_OFFLINE=1 to fail at once")
        raise RetrofitError(
            f"could not fetch pretrained weights for {spec!r} ({where}): pass a local weights file "
            f"({LOCAL_WEIGHTS_FLAGS})."
        ) from e

