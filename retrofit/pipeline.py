"""The one training pipeline behind ``retrofit fit`` and :func:`retrofit.retrofit`.

Both build their Trainer with :func:`trainer` - the defaults are defined here and nowhere else - and run
it with :func:`train`: the fault callbacks first, the export through
:class:`~retrofit.callbacks.RegisterExport` last, a stop turned into one line. They differ only in where
the settings come from (a config and the command line, or keywords) and where the results land (a run
folder with logs and checkpoints, or the caller's ``out_dir``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import Callback, ProgressBar

from .callbacks import RegisterExport, StepProgressBar
from .faults import continue_run, explain_stops, fault_callbacks
from .steps import ignore_epoch_warnings, log_interval

MAX_STEPS = 1000  # optimizer steps of a run that sets none (the recipes set their own)
# "auto" and every precision lightning.Trainer takes (its own type, so the CLI checks a value before any model).
Precision = Literal["auto"] | typing.get_type_hints(L.Trainer.__init__)["precision"]


def auto_precision(accelerator: str | Accelerator = "auto") -> str:
    """``bf16-mixed`` on a GPU with native bf16 (compute capability 8.0 on), ``16-mixed`` on older GPUs, ``32-true``
    elsewhere: a CPU emulates half-precision matmuls slower than it runs float32, unless asked otherwise."""
    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    return "32-true"


def trainer(
    *,
    max_steps: int = MAX_STEPS,
    precision: Precision = "auto",
    accelerator: str | Accelerator = "auto",
    callbacks: list[Callback] | Callback | None = None,
    enable_progress_bar: bool | None = None,
    log_every_n_steps: int | None = None,
    **kwargs: Any,
) -> L.Trainer:
    """A Lightning Trainer with retrofit's defaults; other options are Lightning's.

    Args:
        max_steps: optimizer steps to train.
        precision: ``auto``: bf16-mixed on a GPU with native bf16, 16-mixed on an older GPU, 32-true on a CPU
            (retrofit.pipeline.auto_precision); or any precision lightning.Trainer takes.
        accelerator: ``cpu``, ``gpu``, ``auto``, ... (Lightning's).
        callbacks: Lightning callbacks; a bar that counts steps (StepProgressBar) is added unless one is given.
        enable_progress_bar: show the progress bar (None: yes, as Lightning).
        log_every_n_steps: how often the loggers get the training numbers; None: every 50 steps, or about ten
            times in a shorter run (retrofit.steps.log_interval).
    """
    callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
    if enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    ignore_epoch_warnings()
    return L.Trainer(
        max_steps=max_steps,
        precision=auto_precision(accelerator) if precision in ("auto", None) else precision,
        accelerator=accelerator,
        callbacks=callbacks,
        enable_progress_bar=enable_progress_bar,
        log_every_n_steps=log_interval(max_steps) if log_every_n_steps is None else log_every_n_steps,
        **kwargs,
    )


def train(
    run: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    resume: Callable[[L.Trainer], str],
    ckpt_path: str | None = None,
    export: RegisterExport | None = None,
) -> None:
    """Fit ``module`` on ``datamodule`` with the Trainer ``run`` (from ``ckpt_path`` if given), then export.

    A resumed run continues in its checkpoint's run folder (:func:`~retrofit.faults.continue_run`). The fault
    callbacks go first and ``export`` last. ``resume(run)``, asked once the run folder is known, is the command
    that resumes a stopped run (``{ckpt}`` / ``{path}`` stand for the checkpoint, see
    :class:`~retrofit.faults.StopCheckpoint`); a stop (SIGTERM, Ctrl-C, a non-finite loss) raises one
    :class:`~retrofit.errors.RetrofitError` line that names it.
    """
    continue_run(run, ckpt_path)
    run.callbacks = [*fault_callbacks(resume(run)), *run.callbacks, *([export] if export is not None else [])]
    if ckpt_path is not None and Path(ckpt_path).is_file():
        # said before fit, Lightning's public way: the module's setup then knows it resumes and keeps what the run
        # found about its teacher instead of searching again (fit(ckpt_path=...) tells it only after setup)
        run.ckpt_path, ckpt_path = ckpt_path, None
    with explain_stops(run):
        run.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
