"""timm-native export: a directory that plain ``timm.create_model('local-dir:DIR', pretrained=True)`` reads.

This module owns the export folder: writing it, recognising it and reading it back. (It is ``_export``, not
``export``: a submodule of that name would shadow the :func:`export` function on the lazily imported package.)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError
from timm.models import save_for_hf
from torch import nn

from .card import before_after, write_card
from .errors import RetrofitError, first_line
from .files import apply_umask
from .surgery import at_input_size, check_supported, count_registers, timm_model

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


def check_free(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty ``out_dir`` unless ``overwrite``: callers check before work that would be lost."""
    out = Path(out_dir)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RetrofitError(f"{out} already exists and is not empty: choose another directory, or replace it with "
                            "--overwrite true (overwrite=True in Python).")


def export(
    model: nn.Module,
    out_dir: str | Path,
    overwrite: bool = False,
    *,
    img_size: int | None = None,
    source: Mapping[str, str] | None = None,
    repo_id: str | None = None,
    diagnose_report: Mapping[str, Any] | str | Path | None = None,
    **metadata: Any,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's hub layout) and the model card to ``out_dir``, atomically.

    ``img_size``: the resolution the model was trained at. The export is built for it
    (:func:`retrofit.surgery.at_input_size`: ``img_size`` and ``dynamic_img_size=True`` in config.json's
    ``model_args``), so plain timm runs it at that size, and at any other. ``source``: where the original
    weights came from (:func:`retrofit.backbones.weights_source`); the card names it, and gives a license only
    when the source has one (config.json's ``pretrained_cfg`` then agrees); without it, "not recorded".

    Everything is written to a temporary sibling directory that is renamed into place at the end,
    so an interrupted or failed export (a full disk) leaves the previous ``out_dir`` as it was and no
    temporary folder. An existing non-empty ``out_dir`` is replaced only with ``overwrite=True``, and
    never when it is the folder the original model was loaded from (``metadata["backbone"]`` or the
    model's own ``pretrained_cfg``). Files get the user's umask. ``metadata`` lands under ``"retrofit"``
    in config.json; README.md is the model card (:mod:`retrofit.card`), with the before/after numbers of
    ``diagnose_report`` (a ``diagnose --compare`` report, its JSON or folder) and loading code for
    ``repo_id`` (the Hub repo it is meant for) when given.
    """
    check_supported(model)
    model = at_input_size(model, img_size) if img_size else model
    info = {"version": version("retrofit"), "num_registers": count_registers(model), "source": dict(source or {}),
            **({"img_size": img_size} if img_size else {}), **metadata}
    if diagnose_report is not None:
        info["diagnose"] = before_after(diagnose_report, info["num_registers"])
    out = Path(out_dir)
    check_target(model, out, metadata.get("backbone"))
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():  # a replace was cut short between its two renames
        old.rename(out)
    check_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            size = {"img_size": img_size} if img_size else None  # pretrained_cfg's input_size: the training size
            save_for_hf(model, tmp, model_config={"retrofit": info}, safe_serialization=True, data_config=size)
            _set_license(tmp / "config.json", info["source"].get("license"))
            write_card(model, tmp, info, out.name, repo_id)
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


def _set_license(config_path: Path, license: str | None) -> None:
    """config.json's license is the source's, or none: timm copies the architecture's default config, whose license
    belongs to hub weights this model may not have."""
    config = json.loads(config_path.read_text())
    config["pretrained_cfg"].pop("license", None)
    if license:
        config["pretrained_cfg"]["license"] = license
    config_path.write_text(json.dumps(config, indent=2))


def is_export_dir(path: str | Path) -> bool:
    """A folder with a config.json: what :func:`export` writes (and timm's ``local-dir:`` reads)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def export_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an export directory."""
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RetrofitError(f"{path}/config.json is missing or not valid JSON: export the model again.") from e


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
