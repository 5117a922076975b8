"""load_backbone: a timm name, a timm name plus a local checkpoint, or a retrofit export directory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
from torch import nn

from .errors import RetrofitError, first_line
from .export import is_export_dir, load
from .network import hub_or_cache
from .surgery import check_supported

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
LOCAL_WEIGHTS_FLAGS = "checkpoint=PATH in Python, --model.checkpoint PATH in retrofit fit, --checkpoint PATH elsewhere"


def _from_file(spec: str, path: Path, model_kwargs: dict[str, Any]) -> nn.Module:
    """``spec`` with weights from a local file, through timm's own loader (``pretrained_cfg_overlay``).

    timm reads it without running code (safetensors or weights-only pickle), unwraps training
    checkpoints (``state_dict`` / ``model`` / EMA keys, a ``module.`` prefix), converts the family's
    foreign key layouts (DINOv2 release, OpenAI CLIP, HF) with its ``checkpoint_filter_fn`` and loads
    strictly, adapting the classifier to ``num_classes``.
    """
    if not path.is_file():
        raise RetrofitError(f"checkpoint {path} does not exist: check the path.")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        suffixes = ", ".join(CHECKPOINT_SUFFIXES)
        raise RetrofitError(f"checkpoint {path.name} has an unknown suffix: use one of {suffixes}.")
    try:
        return timm.create_model(spec, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **model_kwargs)
    except Exception as e:  # unreadable, foreign or mismatched weights: the cause says which
        raise RetrofitError(
            f"checkpoint {path.name} does not load into {spec} ({type(e).__name__}: {first_line(e, 160)}): "
            "pass the model name these weights were trained with, or a file that is not corrupt."
        ) from e


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
        return _from_file(spec, Path(checkpoint), model_kwargs).eval()
    with hub_or_cache() as unreachable:  # no route to the Hub: the cache or a failure at once, not minutes of retries
        try:
            return timm.create_model(spec, pretrained=True, **model_kwargs).eval()
        except Exception as e:
            if unreachable is not None:
                where = f"{unreachable}, and they are not in the local cache"
            elif huggingface_hub.constants.HF_HUB_OFFLINE:
                where = "HF_HUB_OFFLINE is set and they are not in the local cache"
            else:
                where = f"{type(e).__name__}: {first_line(e, 120)}"
            raise RetrofitError(
                f"could not fetch pretrained weights for {spec!r} ({where}): pass a local weights file "
                f"({LOCAL_WEIGHTS_FLAGS})."
            ) from e

