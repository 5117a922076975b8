"""load_backbone: a timm name, a timm name plus a local checkpoint, or a retrofit export directory.

It also records where the weights came from (:func:`weights_source`), so that a model card names the
truth: hub weights by name and tag, a local file by name and sha256, a bare architecture as random.
"""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
from torch import nn

from ._export import WEIGHTS_NAME, export_config, is_export_dir, load
from .errors import RetrofitError, first_line
from .network import hub_or_cache
from .surgery import check_supported

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
LOCAL_WEIGHTS_FLAGS = "checkpoint=PATH in Python, --model.checkpoint PATH in retrofit fit, --checkpoint PATH elsewhere"
SOURCE_ATTR = "retrofit_source"  # the record load_backbone leaves on the model it returns


def weights_source(model: nn.Module) -> dict[str, str]:
    """Where ``model``'s weights came from, as :func:`load_backbone` recorded it: ``model`` (timm name and tag),
    ``hub_id`` and ``license`` for hub weights; ``file`` and ``sha256`` for local ones; ``weights: random`` for a
    bare architecture. Empty for a model it did not load (an in-memory module: not recorded)."""
    return dict(getattr(model, SOURCE_ATTR, None) or {})


def _recorded(model: nn.Module, source: dict[str, str]) -> nn.Module:
    setattr(model, SOURCE_ATTR, source)
    return model


def sha256(path: str | Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks (a checkpoint can be larger than memory allows twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_source(spec: str, model: nn.Module) -> dict[str, str]:
    """Hub weights: the name and tag timm resolved (``vit_base_patch14_dinov2.lvd142m``), the repo and its license."""
    cfg = model.pretrained_cfg
    name = spec if spec.startswith("hf-hub:") else ".".join(p for p in (cfg["architecture"], cfg.get("tag")) if p)
    source = {"model": name, "hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url"), "license": cfg.get("license")}
    return {k: v for k, v in source.items() if v}


def _export_source(path: Path) -> dict[str, str]:
    """A retrofit export: its weights file by name and hash, and the license its own card knew (if any)."""
    known = export_config(path).get("retrofit", {}).get("source", {})
    source = {"file": f"{path.resolve().name}/{WEIGHTS_NAME}", "sha256": sha256(path / WEIGHTS_NAME)}
    return source | ({"license": known["license"]} if known.get("license") else {})


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
        model = load(spec, **model_kwargs)
        return _recorded(model, {"model": model.pretrained_cfg["architecture"], **_export_source(Path(spec))})
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
        return _recorded(model.eval(), {"model": spec, "weights": "random"})
    if checkpoint is not None:
        model = _from_file(spec, Path(checkpoint), model_kwargs).eval()
        return _recorded(model, {"model": spec, "file": Path(checkpoint).name, "sha256": sha256(checkpoint)})
    with hub_or_cache() as unreachable:  # no route to the Hub: the cache or a failure at once, not minutes of retries
        try:
            model = timm.create_model(spec, pretrained=True, **model_kwargs).eval()
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
    return _recorded(model, _hub_source(spec, model))

