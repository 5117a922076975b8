"""retrofit(): the whole pipeline in one call - module, data, Trainer, export - as ``retrofit fit`` runs it."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from . import hub
from .callbacks import RegisterExport
from .data import RetrofitDataModule
from .errors import RetrofitError
from .faults import check_resume
from .module import RetrofitModule
from .pipeline import train, trainer
from .surgery import at_input_size

_TARGETS = (RetrofitModule, RetrofitDataModule, trainer)


def _parameters(target: Any) -> set[str]:
    """The keyword names ``target`` takes; the pipeline's ``trainer`` takes lightning.Trainer's as well."""
    names = set(inspect.signature(target).parameters)
    if "kwargs" in names and target is trainer:
        names |= _parameters(L.Trainer)
    return names - {"self", "args", "kwargs"}


def _route(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Split ``settings`` by constructor (module, data, trainer); a name two of them take goes to both."""
    accepted = [_parameters(target) for target in _TARGETS]
    unknown = sorted(set(settings) - set().union(*accepted))
    if unknown:
        raise RetrofitError(
            f"unknown setting(s) {', '.join(unknown)}: use arguments of RetrofitModule, RetrofitDataModule or "
            "lightning.Trainer."
        )
    return [{k: v for k, v in settings.items() if k in names} for names in accepted]


def _data_module(data: Any, settings: dict[str, Any]) -> RetrofitDataModule:
    """A RetrofitDataModule for a folder / HF spec, a tensor of images, or one the caller built."""
    if isinstance(data, RetrofitDataModule):
        if settings:
            raise RetrofitError(
                f"data settings {', '.join(sorted(settings))} were given with a ready RetrofitDataModule: "
                "set them on the data module instead."
            )
        return data
    if isinstance(data, torch.Tensor):
        return RetrofitDataModule.from_tensor(data, **settings)
    if isinstance(data, (str, Path)):
        return RetrofitDataModule(source=str(data), **settings)
    raise RetrofitError(
        f"data of type {type(data).__name__} is not supported: pass an image folder, 'hf:NAME', a tensor of "
        "images or a RetrofitDataModule."
    )


@contextmanager
def _export_folder(out_dir: str | Path | None, repo_id: str | None) -> Iterator[Path | None]:
    """Where the export goes: ``out_dir``, a scratch folder when it is only pushed, or nowhere."""
    if out_dir is not None or repo_id is None:
        yield None if out_dir is None else Path(out_dir)
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch) / repo_id.split("/")[-1]


def retrofit(
    backbone: str | nn.Module,
    data: str | Path | torch.Tensor | RetrofitDataModule,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    ckpt_path: str | None = None,
    **settings: Any,
) -> nn.Module:
    """Give ``backbone`` register tokens by self-distillation; return the plain timm model, as it is exported.

    ``backbone``: a timm name / export directory (with ``checkpoint=`` for local weights) or a timm ViT.
    ``data``: an image folder, ``hf:NAME`` / ``imagefolder:DIR`` / a saved HF dataset, a normalised
    (N, 3, H, W) tensor of images, or a :class:`RetrofitDataModule`. ``out_dir``: also export there
    (timm-native, atomic, built for the training resolution; ``overwrite`` replaces an existing export).
    ``push_to_hub``: also upload the export to this Hub repo (``USER/NAME``; the token is checked before
    training, and a failed push keeps ``out_dir``). ``ckpt_path`` resumes a run.
    Every other keyword goes to whichever of :class:`RetrofitModule` (``num_registers``, ``freeze``, ``lr``,
    ...), :class:`RetrofitDataModule` (``img_size``, ``batch_size``, ...) and the Trainer
    (:func:`retrofit.pipeline.trainer`: ``max_steps``, ``precision``, ``accelerator``, ``devices``,
    ``strategy``, ``callbacks``, ...) takes it, with the defaults ``retrofit fit`` has: 1000 steps, precision
    ``auto`` (bf16-mixed on GPUs with native bf16, 16-mixed on older ones, 32-true on CPU), the backbone's own
    image size. Unlike ``retrofit fit`` it keeps no run folder: checkpointing and logging are off unless asked
    for. A NaN or infinite loss, SIGTERM or Ctrl-C stop the run with a one-line :class:`RetrofitError` after
    saving a resumable checkpoint (:mod:`retrofit.faults`).
    """
    module_kw, data_kw, trainer_kw = _route(settings)
    if push_to_hub is not None:
        hub.check_repo(push_to_hub)
    check_resume(ckpt_path)
    module = RetrofitModule(backbone, **module_kw)
    datamodule = _data_module(data, data_kw)
    datamodule.setup("fit")  # a bad data source: one line before the Trainer reports its devices
    run = trainer(**{"logger": False, "enable_checkpointing": False, **trainer_kw})
    with _export_folder(out_dir, push_to_hub) as folder:
        export = None if folder is None else RegisterExport(folder, overwrite=overwrite, push_to_hub=push_to_hub)
        train(run, module, datamodule, ckpt_path=ckpt_path, export=export,
              resume=lambda _: "retrofit(..., ckpt_path={path!r})")
    return at_input_size(module.export_model(), datamodule.img_size)
