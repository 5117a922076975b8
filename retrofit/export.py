"""timm-native export: a directory that plain ``timm.create_model('local-dir:DIR', pretrained=True)`` reads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError
from timm.models import save_for_hf
from torch import nn

from . import __version__
from .backbones import export_config
from .errors import RetrofitError, first_line
from .files import apply_umask
from .surgery import check_supported, count_registers, timm_model

WEIGHTS_NAME = "model.safetensors"


def source_dir(model: nn.Module) -> Path | None:
    """The folder ``model``'s weights were read from, when it was loaded from a local export directory."""
    cfg = getattr(timm_model(model), "pretrained_cfg", None) or {}
    return Path(cfg["file"]).resolve() if cfg.get("source") == "local-dir" and cfg.get("file") else None


def check_target(model: nn.Module, out_dir: str | Path, backbone: object = None) -> None:
    """Refuse to export into the folder the original weights come from: the model would replace its own source."""
    out = Path(out_dir).resolve()
    named = isinstance(backbone, (str, Path)) and Path(backbone).is_dir()
    sources = {source_dir(model), Path(backbone).resolve() if named else None}
    if out in sources:
        raise RetrofitError(f"{out_dir} holds the original model this one was made from: export to another directory.")


def export(model: nn.Module, out_dir: str | Path, overwrite: bool = False, **metadata: Any) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's hub layout) to ``out_dir``, atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the end,
    so an interrupted or failed export (a full disk) leaves the previous ``out_dir`` as it was and no
    temporary folder. An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``, and
    never when it is the folder the original model was loaded from (``metadata["backbone"]`` or the
    model's own ``pretrained_cfg``). Files get the user's umask. ``metadata`` lands under ``"retrofit"``
    in config.json.
    """
    check_supported(model)
    out = Path(out_dir)
    check_target(model, out, metadata.get("backbone"))
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():  # a replace was cut short between its two renames
        old.rename(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RetrofitError(f"{out} already exists and is not empty: choose another directory or pass overwrite=True.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        info = {"version": __version__, "num_registers": count_registers(model), **metadata}
        try:
            save_for_hf(model, tmp, model_config={"retrofit": info}, safe_serialization=True)
        except (OSError, SafetensorError) as e:  # e.g. a full disk
            kept = f"{out} is unchanged" if out.exists() else f"nothing was written to {out}"
            raise RetrofitError(f"could not write the export ({first_line(e, 80)}): {kept}; free space or "
                                "choose another directory.") from e
        apply_umask(tmp)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(path: str | Path, **model_kwargs: Any) -> nn.Module:
    """Create the model saved by :func:`export` (eval mode), through timm's own ``local-dir:`` loader."""
    path = Path(path)
    export_config(path)  # clear error on a missing or broken config.json
    if not (path / WEIGHTS_NAME).is_file():
        raise RetrofitError(f"{path} has no {WEIGHTS_NAME}: it is not a complete export, export the model again.")
    try:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, **model_kwargs)
    except Exception as e:
        raise RetrofitError(
            f"{path} could not be loaded ({type(e).__name__}: {first_line(e, 120)}): export it again."
        ) from e
    return model.eval()
