"""retrofit(): the whole pipeline in one call - module, data, Lightning Trainer, export."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from torch import nn

from . import hub
from .callbacks import StepProgressBar, training_facts
from .data import RetrofitDataModule
from .errors import RetrofitError
from .faults import check_resume, continue_run, explain_stops, fault_callbacks
from .features import square_size
from .module import RetrofitModule
from .steps import ignore_epoch_warnings, log_interval

_TARGETS = (RetrofitModule, RetrofitDataModule, L.Trainer)


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _route(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Split ``settings`` by constructor (module, data, trainer); a name two of them take goes to both."""
    accepted = [_parameters(cls) for cls in _TARGETS]
    unknown = sorted(set(settings) - set().union(*accepted))
    if unknown:
        raise RetrofitError(
            f"unknown setting(s) {', '.join(unknown)}: use arguments of RetrofitModule, RetrofitDataModule or "
            "lightning.Trainer."
        )
    return [{k: v for k, v in settings.items() if k in names} for names in accepted]


def _data_module(data: Any, settings: dict[str, Any], img_size: int) -> RetrofitDataModule:
    """A RetrofitDataModule for a folder / HF spec, a tensor of images, or one the caller built."""
    if isinstance(data, RetrofitDataModule):
        if settings:
            raise RetrofitError(
                f"data settings {', '.join(sorted(settings))} were given with a ready RetrofitDataModule: "
                "set them on the data module instead."
            )
        return data
    settings = {"img_size": img_size, "num_workers": 0, **settings}
    if isinstance(data, torch.Tensor):
        return RetrofitDataModule.from_tensor(data, **settings)
    if isinstance(data, (str, Path)):
        return RetrofitDataModule(source=str(data), **settings)
    raise RetrofitError(
        f"data of type {type(data).__name__} is not supported: pass an image folder, 'hf:NAME', a tensor of "
        "images or a RetrofitDataModule."
    )


def retrofit(
    backbone: str | nn.Module,
    data: str | Path | torch.Tensor | RetrofitDataModule,
    *,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    num_registers: int = 4,
    max_steps: int = 1000,
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    callbacks: list[L.Callback] | None = None,
    ckpt_path: str | None = None,
    push_to_hub: str | None = None,
    **settings: Any,
) -> nn.Module:
    """Give ``backbone`` ``num_registers`` register tokens by self-distillation; return the plain timm model.

    ``backbone``: a timm name / export directory (with ``checkpoint=`` for local weights) or a timm ViT.
    ``data``: an image folder, ``hf:NAME`` / ``imagefolder:DIR`` / a saved HF dataset, a normalised
    (N, 3, H, W) tensor of images, or a :class:`RetrofitDataModule`. ``out_dir``: also export there
    (timm-native, atomic; ``overwrite`` replaces an existing export). ``precision``: Lightning's
    (default ``bf16-mixed`` with CUDA, else ``32-true``); ``accelerator`` / ``devices`` / ``strategy``
    (``ddp``, ``fsdp``, ...) and ``callbacks`` go to ``lightning.Trainer``; ``ckpt_path`` resumes a run.
    ``push_to_hub``: also upload the export to this Hub repo (``USER/NAME``, through timm's
    ``push_to_hf_hub``; the token is checked before training, and a failed push keeps ``out_dir``).
    A NaN or infinite loss, SIGTERM or Ctrl-C stop the run with a one-line :class:`RetrofitError` after
    saving a resumable checkpoint (:mod:`retrofit.faults`).
    Every other keyword goes to whichever of :class:`RetrofitModule` (``freeze``, ``lr``, ``targets``,
    ...), :class:`RetrofitDataModule` (``img_size``, ``batch_size``, ...) and ``lightning.Trainer``
    (``logger``, ``enable_checkpointing``, ...) takes it. ``img_size`` defaults to the backbone's own
    size; checkpointing and logging are off unless asked for.
    """
    module_kw, data_kw, trainer_kw = _route(settings)
    if push_to_hub is not None:
        hub.check_repo(push_to_hub)
    check_resume(ckpt_path)
    module = RetrofitModule(backbone, num_registers=num_registers, **module_kw)
    dm = _data_module(data, data_kw, img_size=square_size(module.teacher))
    dm.setup("fit")  # a bad data source: one line before the Trainer reports its devices
    if precision is None:
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    trainer_kw = {"logger": False, "enable_checkpointing": False, "log_every_n_steps": log_interval(max_steps),
                  **trainer_kw}
    ignore_epoch_warnings()
    callbacks = [*fault_callbacks(resume="retrofit(..., ckpt_path={path!r})"), *(callbacks or [])]
    if trainer_kw.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())  # as fit's: steps of the run, not "Epoch 4/-2"
    trainer = L.Trainer(max_steps=max_steps, precision=precision, accelerator=accelerator, devices=devices,
                        strategy=strategy, callbacks=callbacks, **trainer_kw)
    continue_run(trainer, ckpt_path)
    with explain_stops(trainer):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    model = module.export_model()
    if trainer.is_global_zero and (out_dir is not None or push_to_hub is not None):
        _export(module, model, training_facts(trainer), out_dir, overwrite, push_to_hub)
    return model


def _export(module: RetrofitModule, model: nn.Module, facts: dict[str, Any], out_dir: str | Path | None,
            overwrite: bool, repo_id: str | None) -> None:
    """Export to ``out_dir`` (a scratch folder when only pushing), then push to ``repo_id``."""
    if out_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            _export(module, model, facts, Path(scratch) / repo_id.split("/")[-1], overwrite, repo_id)
        return
    folder = module.export(out_dir, overwrite=overwrite, model=model, repo_id=repo_id, **facts)
    if repo_id is not None:
        hub.push_to_hub(folder, repo_id)
