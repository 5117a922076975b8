"""When a training run goes wrong: stop at a clean step, keep every good result, say why in one line.

- :class:`NonFiniteGuard` stops at the first step whose loss or gradients are NaN or infinite, before
  the optimizer applies them, and names the step, the batch and the likely cause.
- :class:`StopCheckpoint` makes SIGTERM and Ctrl-C stop after the current step (Lightning's own SIGTERM
  handling; a second Ctrl-C stops at once), saves a resumable checkpoint there - and the last good state
  at a non-finite step - and turns the stop into one line with the command that resumes it.
- :func:`continue_run` points a resumed run's loggers at the run folder of the checkpoint it resumes
  (``metrics.csv`` goes on where it stopped).
- :class:`CacheReport` logs what a target cache had to repair by the end of the run.

``retrofit fit`` and :func:`retrofit.retrofit` install the callbacks (:func:`fault_callbacks`).
"""

from __future__ import annotations

import csv
import logging
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from .cache import TargetCache
from .errors import RetrofitError

log = logging.getLogger(__name__)

SHOWN_KEYS = 3  # images of a bad batch named in the error
LIGHTNING_SIGNALS = "lightning.pytorch.trainer.connectors.signal_connector"  # the logger of Lightning's handler
LIGHTNING_CHECKPOINTS = ("last", "best", "hpc")  # ckpt_path values Lightning resolves itself


class NonFiniteError(RetrofitError):
    """A NaN or infinite loss or gradient, caught before the optimizer applied it."""


class Interrupted(RetrofitError):
    """A run stopped by a signal; the process should exit with 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def _signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def _keys(batch: Any) -> str:
    keys = batch.get("key") if isinstance(batch, Mapping) else None
    if not keys:
        return ""
    return f" (images {', '.join(map(str, keys[:SHOWN_KEYS]))}{', ...' if len(keys) > SHOWN_KEYS else ''})"


def _not_finite(tensors: Iterable[Tensor]) -> bool:
    """Any NaN or inf among ``tensors`` (the largest magnitude is NaN or inf), with one device sync for all."""
    peaks = [torch.linalg.vector_norm(t.detach(), float("inf")).float() for t in tensors]
    return bool(peaks) and not bool(torch.isfinite(torch.stack(peaks).max()))


def _likely_cause(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, loss: bool) -> str:
    precision = str(trainer.precision)
    if precision.startswith("16"):
        return (f"likely a float16 overflow under precision {precision}: use bf16-mixed "
                "(--trainer.precision bf16-mixed) or 32-true")
    images = batch.get("image") if isinstance(batch, Mapping) else batch if isinstance(batch, Tensor) else None
    if isinstance(images, Tensor) and images.is_floating_point() and _not_finite([images]):
        return "the batch holds NaN or infinite pixel values: fix or drop those images"
    bad = next((name for name, p in pl_module.named_parameters() if _not_finite([p])), None)
    if bad is not None:
        return f"weight {bad} is not finite: check the backbone's weights"
    if loss:
        return ("the batch and weights are finite, so a target is not (check the teacher and the target cache, "
                "e.g. delete --model.cache_dir) or training diverged (lower --model.lr)")
    return "training diverged: lower the learning rate (--model.lr)"


class NonFiniteGuard(L.Callback):
    """Stops at the first step whose loss or gradients are NaN or infinite, before the optimizer applies them.

    Raises :class:`NonFiniteError` naming the step, the batch's images and the likely cause (float16
    overflow, bad pixels, bad weights, bad targets or divergence); the weights are still those of the
    last good step, which :class:`StopCheckpoint` saves. All ranks decide together, so DDP stops as one.
    Gradients are not checked under a GradScaler (``16-mixed``): it skips such steps and lowers its scale
    by design; a non-finite loss there is still caught.
    """

    def __init__(self) -> None:
        self._batch: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        cause = _likely_cause(trainer, pl_module, self._batch, loss=what.startswith("the loss"))
        raise NonFiniteError(f"{what} at step {trainer.global_step + 1}{_keys(self._batch)}: {cause}")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = not _not_finite([loss])
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            self._stop(trainer, pl_module, "the loss is not finite on another device" if finite else
                       f"the loss is {loss.item()}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = {name: p.grad for name, p in pl_module.named_parameters() if p.grad is not None}
        if _not_finite(grads.values()):
            bad = next(name for name, g in grads.items() if _not_finite([g]))
            self._stop(trainer, pl_module, f"the gradient of {bad} is not finite")


class StopCheckpoint(L.Callback):
    """SIGTERM or Ctrl-C stop after the current step with a resumable checkpoint; a stop says so in one line.

    SIGTERM goes through Lightning's own handling (the loop stops at the end of the step and raises
    ``SIGTERMException``); the first Ctrl-C is routed the same way, a second one stops at once. The state
    is saved to ``<checkpoint dir>/stopped-step=N.ckpt`` at the end of the step that saw the signal -
    before other callbacks' hooks, which the signal may break (a progress bar whose pipe ``timeout``
    closed) - and on a :class:`NonFiniteError` (the weights are still the last good ones); never when
    the weights are not finite. Put it first among the callbacks, and :meth:`explain` around
    ``trainer.fit``: it turns the stop into one line with the reason, the checkpoint and ``resume``: the
    command that resumes, with ``{ckpt}`` for the checkpoint's path quoted for a shell, or ``{path}``
    for it as a plain string.
    """

    def __init__(self, resume: str) -> None:
        self.resume = resume
        self.signum: int | None = None
        self.saved: Path | None = None
        self.directory: Path | None = None
        self.exception: BaseException | None = None
        self.step = 0
        self.max_steps = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning registered its SIGTERM handler (it restores every handler when fit ends)."""
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.signum is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            if signum == signal.SIGINT:
                with suppress(OSError):  # a closed pipe must not turn the stop into a crash
                    print("retrofit: Ctrl-C: stopping after this step (press Ctrl-C again to stop at once).",
                          file=sys.stderr)
            self.signum = signum
            if callable(lightning_sigterm):
                notice = logging.getLogger(LIGHTNING_SIGNALS)  # its "Received SIGTERM: 2" would misname Ctrl-C
                notice.disabled, disabled = True, notice.disabled
                try:
                    lightning_sigterm(signum, frame)
                finally:
                    notice.disabled = disabled

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)

    def _directory(self, trainer: L.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._directory(trainer) / f"stopped-step={trainer.global_step}.ckpt"
        if path == self.saved or _not_finite(pl_module.parameters()):
            return  # saved at this step already, or not a state worth resuming from
        trainer.save_checkpoint(path, weights_only=False)
        self.saved = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.received_sigterm:
            self._save(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.step, self.max_steps, self.directory = trainer.global_step, trainer.max_steps, self._directory(trainer)
        self.exception = exception
        if isinstance(exception, (SIGTERMException, NonFiniteError)):
            self._save(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.saved, self.exception = None, None, None  # a Trainer may fit more than once

    def _resume_from(self) -> str:
        """Where to resume: the checkpoint saved at the stop, else the newest one in the checkpoint folder."""
        latest = self.saved
        if latest is None and self.directory is not None and self.directory.is_dir():
            latest = max(self.directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
        if latest is None:
            return "no checkpoint to resume from"
        what = "saved" if latest == self.saved else "no checkpoint at this step; the latest is"
        command = self.resume.format(ckpt=shlex.quote(str(latest)), path=str(latest))
        return f"{what} {latest}; resume with: {command}"

    @contextmanager
    def explain(self) -> Iterator[None]:
        """Turn a stop inside ``trainer.fit`` into one line: why, at which step, what was saved, how to resume."""
        try:
            yield
        except SIGTERMException:
            raise self._stopped(self.signum or signal.SIGTERM) from None
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; {self._resume_from()}") from None
        except SystemExit:  # Lightning exits after a KeyboardInterrupt; Rich when the signal closed its pipe
            if self.signum is not None and self.saved is not None:
                raise self._stopped(self.signum) from None
            if not isinstance(self.exception, KeyboardInterrupt):
                raise
            raise Interrupted(f"stopped at once by Ctrl-C (SIGINT) at step {self.step}: {self._resume_from()}",
                              signal.SIGINT) from None

    def _stopped(self, signum: int) -> Interrupted:
        of = f" of {self.max_steps}" if self.max_steps > 0 else ""
        return Interrupted(f"stopped by {_signal_name(signum)} after step {self.step}{of}: {self._resume_from()}",
                           signum)


class CacheReport(L.Callback):
    """Logs, at the end of the run, how many target-cache entries were bad and recomputed (or not stored)."""

    def _report(self, pl_module: L.LightningModule) -> None:
        for value in vars(pl_module).values():
            if isinstance(value, TargetCache) and (line := value.report()) is not None:
                log.warning(line)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._report(pl_module)


class ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer for a resumed run: it appends to the folder's ``metrics.csv`` and keeps its columns,
    where Lightning's deletes the file of a non-empty run folder.

    It overrides ``ExperimentWriter._check_log_dir_exists`` (private, Lightning 2.6.6: called by the constructor to
    warn about and delete an existing metrics.csv); test_faults.py::test_a_resumed_run_continues_its_logs_in_place
    checks it.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


def fault_callbacks(resume: str) -> list[L.Callback]:
    """The callbacks ``retrofit fit`` and ``retrofit()`` put first: stop checkpoint, non-finite guard, cache report.

    ``resume`` is the command that resumes a stopped run (see :class:`StopCheckpoint`).
    """
    return [StopCheckpoint(resume), NonFiniteGuard(), CacheReport()]


@contextmanager
def explain_stops(trainer: L.Trainer) -> Iterator[None]:
    """:meth:`StopCheckpoint.explain` of the trainer's StopCheckpoint (nothing changes without one)."""
    stop = next((c for c in trainer.callbacks if isinstance(c, StopCheckpoint)), None)
    if stop is None:
        yield
        return
    with stop.explain():
        yield


def check_resume(ckpt_path: str | Path | None) -> bool:
    """Whether ``ckpt_path`` names a checkpoint file to resume from (not one Lightning resolves itself, such as
    ``last``); one that does not exist is a one-line error, so callers check before building anything."""
    if ckpt_path is None or str(ckpt_path) in LIGHTNING_CHECKPOINTS or str(ckpt_path).startswith("registry"):
        return False
    if not Path(ckpt_path).is_file():
        raise RetrofitError(f"checkpoint {ckpt_path} does not exist: pass a .ckpt from a run's checkpoints folder.")
    return True


def batches_done(trainer: L.Trainer) -> int:
    """Batches of the current epoch the training loop has stepped through: where a resumed epoch starts again.

    No public hook gives this count when the resumable training loader needs it (a callback's
    ``batch_idx`` comes with the next batch), so it is read from Lightning's loop progress,
    ``trainer.fit_loop.epoch_loop.batch_progress.current.processed`` (Lightning 2.6.6). The attribute is checked by
    tests/test_faults.py::test_batches_done_counts_the_batches_of_the_epoch; the exact resume it serves by
    ::test_signal_stops_with_one_line_a_checkpoint_and_an_exact_resume.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def continue_run(trainer: L.Trainer, ckpt_path: str | Path | None) -> None:
    """Resume in the run folder of the checkpoint: ``<root>/<version>/checkpoints/*.ckpt`` keeps ``<version>``.

    Applies to Lightning's folder loggers (TensorBoard, CSV) whose root is that folder's parent, so the
    logs, the checkpoints and the final ``model/`` of a resumed run land next to the first ones instead
    of in a new ``version_N``; a CSV logger appends to the run's ``metrics.csv`` (Lightning's own would
    delete it on opening the folder). Call before anything asks for ``trainer.log_dir`` or writes a log.
    A checkpoint path that does not exist is a one-line error here, before any training.
    """
    if not check_resume(ckpt_path):
        return
    checkpoints = Path(ckpt_path).resolve().parent
    if checkpoints.name != "checkpoints":
        return
    run = checkpoints.parent
    for logger in trainer.loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)) and Path(logger.root_dir).resolve() == run.parent:
            # Lightning 2.6.6 private attributes (no public setter; the loggers exist before the checkpoint is known):
            # `_version` is what the constructor's version= sets, `_experiment` what the CSV `experiment` property
            # creates on first use. Checked by test_faults.py::test_a_resumed_run_continues_its_logs_in_place.
            logger._version = run.name
            if isinstance(logger, CSVLogger):
                logger._experiment = ContinuedCSVWriter(logger.log_dir)
            # ModelCheckpoint warns about a non-empty folder, which is the point here; it names the folder as the
            # logger's root was given (relative, say), so the filter matches its last three parts
            tail = re.escape(str(Path(run.parent.name, run.name, checkpoints.name)))
            warnings.filterwarnings("ignore", rf"Checkpoint directory (.*/)?{tail} exists and is not empty")
