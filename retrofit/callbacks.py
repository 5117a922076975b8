"""Lightning callbacks that watch artifacts during any Trainer run and export the retrofitted model.

They read the LightningModule by attribute (``student``, ``teacher``, ``targets``, ``margin``,
``export_model()``: the names :class:`retrofit.module.RetrofitModule` uses), so they work on a
user's own module that follows the same names. A probe batch is fixed for the whole run: the
given images (what the student sees), or the first training batch (``batch["image"]``, with
the module's ``margin`` patches of teacher context around the student's window).
"""

from __future__ import annotations

import copy
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn, CustomTimeColumn, ProcessingSpeedColumn
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich import get_console
from rich.progress import TextColumn
from torch import Tensor, nn

from ._export import check_free, check_target, export
from .errors import RetrofitError
from .features import inference, patch_features, patch_size
from .hub import check_repo, push_to_hub
from .metrics import FeatureFidelity, OutlierFraction, PatchNormStats, outlier_mask, repair_scores
from .module import RetrofitModule
from .report import percent
from .surgery import timm_model
from .targets import crop_center

RANK_ZERO_LOG = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info
LIGHTNING_LOGS = ("lightning", "lightning.pytorch", "lightning.fabric")  # those that may have handlers


def _batch_images(batch: Any, key: str) -> Tensor:
    if isinstance(batch, Mapping) and key in batch:
        return batch[key]
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise RetrofitError(
        f"cannot find images in a training batch of type {type(batch).__name__}: pass probe_images=... "
        f"or image_key naming the images in a dict batch."
    )


class _ProbeCallback(L.Callback, ABC):
    """Runs :meth:`evaluate` on a fixed probe batch before training and every ``every_n_steps`` steps."""

    def __init__(
        self, probe_images: Tensor | None, every_n_steps: int, model_attr: str, image_key: str
    ) -> None:
        if every_n_steps < 1:
            raise RetrofitError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.probe_images, self.every_n_steps = probe_images, every_n_steps
        self.model_attr, self.image_key = model_attr, image_key
        self.probe: Tensor | None = None
        self.margin = 0  # patches around the student's window in ``probe``
        self._last_step = -1

    def model(self, pl_module: L.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise RetrofitError(
                f"{type(pl_module).__name__} has no model attribute {self.model_attr!r}: pass model_attr=..."
            )
        return timm_model(model)

    def student_view(self, pl_module: L.LightningModule) -> Tensor:
        """The probe as the student sees it: without the teacher's margin."""
        return crop_center(self.probe, self.margin * patch_size(self.model(pl_module))[0])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe is not None:
            return
        if self.probe_images is None:
            self.probe = _batch_images(batch, self.image_key).detach().clone()
            self.margin = int(getattr(pl_module, "margin", 0))
        else:
            self.probe = self.probe_images.to(pl_module.device)
        self._run(trainer, pl_module)  # the baseline, before the first update

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self._last_step:  # gradient accumulation: several batches per step
            return
        self._last_step = trainer.global_step
        self.evaluate(trainer, pl_module)

    @abstractmethod
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure or draw the model on the probe batch (runs on every rank)."""


class ArtifactMonitor(_ProbeCallback):
    """Logs outlier fractions, norm statistics and fidelity of the model's patch features on a probe batch.

    Every evaluation goes to each of the Trainer's loggers (TensorBoard scalars, W&B, CSV rows, ...)
    at its step, and to ``trainer.callback_metrics`` for other callbacks to monitor.

    Fidelity is the patch cosine to the module's denoised targets (``pl_module.targets(probe, margin)
    .features``, computed once, without moving the targets' random views) when it has ``targets``,
    else to the reference model's (``reference_attr``) features. Keys are ``<prefix>/outlier_high``,
    ``outlier_low``, ``norm_median``, ``norm_p99``, ``norm_max``, ``fidelity_mean``, ``fidelity_p5``, and
    where the probe has artifacts (outliers of the ``reference_attr`` model) ``fidelity_artifacts``,
    ``fidelity_neighbours`` and ``fidelity_elsewhere``: is the harm repaired, not just hidden;
    every evaluation is also kept in :attr:`history`. With ``stop_outlier_fraction`` and/or
    ``stop_fidelity`` the run stops (``trainer.should_stop``) at the first evaluation after a training
    step where the high-norm fraction is <= the one and the mean fidelity >= the other.
    """

    def __init__(
        self,
        probe_images: Tensor | None = None,
        every_n_steps: int = 50,
        k: float = 3.0,
        threshold: float | None = None,
        stop_outlier_fraction: float | None = None,
        stop_fidelity: float | None = None,
        model_attr: str = "student",
        reference_attr: str = "teacher",
        image_key: str = "image",
        prefix: str = "artifacts",
    ) -> None:
        super().__init__(probe_images, every_n_steps, model_attr, image_key)
        self.k, self.threshold = k, threshold
        self.stop_outlier_fraction, self.stop_fidelity = stop_outlier_fraction, stop_fidelity
        self.reference_attr, self.prefix = reference_attr, prefix
        self.reference: Tensor | None = None
        self.artifacts: Tensor | None = None  # the probe's artifact positions in the original model
        self.history: list[dict[str, float]] = []

    def _reference(self, pl_module: L.LightningModule) -> Tensor | None:
        targets = getattr(pl_module, "targets", None)
        if targets is not None:
            state = targets.get_rng_state() if hasattr(targets, "get_rng_state") else None
            features = targets(self.probe, self.margin).features
            if state is not None:  # the training run's views must not depend on this callback
                targets.set_rng_state(state)
            return features
        reference = getattr(pl_module, self.reference_attr, None)
        if reference is None:
            if self.stop_fidelity is not None:
                raise RetrofitError(
                    f"stop_fidelity needs reference features but the module has neither .targets nor "
                    f".{self.reference_attr}: pass reference_attr=... or drop stop_fidelity."
                )
            return None
        reference = timm_model(reference)
        with inference(reference):
            return patch_features(reference, self.student_view(pl_module))

    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """The monitored values for the current model on the probe batch."""
        model = self.model(pl_module)
        with inference(model):
            features = patch_features(model, self.student_view(pl_module))
        if self.reference is None:
            self.reference, self.artifacts = self._reference(pl_module), self._artifacts(pl_module)
        outliers = OutlierFraction(self.k, self.threshold).to(features.device)
        norms = PatchNormStats().to(features.device)
        values = {f"outlier_{k}": v for k, v in outliers(features).items()}
        values |= {f"norm_{k}": v for k, v in norms(features).items()}
        if self.reference is not None:
            fidelity = FeatureFidelity().to(features.device)
            values |= {f"fidelity_{k}": v for k, v in fidelity(features, self.reference).items()}
            if self.artifacts is not None and self.artifacts.any():  # where the harm was, and around it
                scores = repair_scores(features, self.reference, self.artifacts)
                values |= {f"fidelity_{k}": torch.tensor(scores[k]) for k in ("artifacts", "neighbours", "elsewhere")}
        return {name: value.item() for name, value in values.items()}

    def _artifacts(self, pl_module: L.LightningModule) -> Tensor | None:
        """The probe's artifact positions: high-norm outliers of the reference (original) model's features."""
        reference = getattr(pl_module, self.reference_attr, None)
        if reference is None:
            return None
        reference = timm_model(reference)
        with inference(reference):
            return outlier_mask(patch_features(reference, self.student_view(pl_module)), self.k, self.threshold)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = self.measure(pl_module)
        self.history.append({"step": trainer.global_step, **values})
        metrics = {f"{self.prefix}/{k}": v for k, v in values.items()}
        # for monitors and the progress bar; the loggers get every evaluation directly, at its own step,
        # whatever the Trainer's log_every_n_steps
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(self.probe), logger=False)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.global_step > 0 and (self.stop_outlier_fraction is not None or self.stop_fidelity is not None):
            # every rank evaluates here; all must agree to stop or DDP hangs
            if trainer.strategy.reduce_boolean_decision(self._targets_met(values), all=True):
                trainer.should_stop = True
                of = f" of {trainer.max_steps}" if trainer.max_steps > 0 else ""
                rank_zero_info(f"ArtifactMonitor stopped the run at step {trainer.global_step}{of}: "
                               f"{self._reason(values)}.")

    def _reason(self, values: dict[str, float]) -> str:
        """The stop targets that were met, in words."""
        reasons = []
        if self.stop_outlier_fraction is not None:
            reasons.append(f"high-norm outliers {percent(values['outlier_high'])} <= "
                           f"{percent(self.stop_outlier_fraction)}")
        if self.stop_fidelity is not None:
            reasons.append(f"mean fidelity {values['fidelity_mean']:.3f} >= {self.stop_fidelity:.3f}")
        return " and ".join(reasons)

    def _targets_met(self, values: dict[str, float]) -> bool:
        clean = self.stop_outlier_fraction is None or values["outlier_high"] <= self.stop_outlier_fraction
        faithful = self.stop_fidelity is None or values["fidelity_mean"] >= self.stop_fidelity
        return clean and faithful


class NormMapLogger(_ProbeCallback):
    """Figures of norm, CLS-attention and PCA maps of the probe images, one row per image, every N steps.

    Loggers that take images get them (``TensorBoardLogger``: ``add_image``; ``WandbLogger`` and any
    logger with ``log_image(key, images, step)``: ``log_image``). PNGs ``norm_maps_step<N>.png`` go to
    ``out_dir`` when given, and to ``<trainer.log_dir>/norm_maps`` when no logger takes images (CSV).
    """

    def __init__(
        self,
        probe_images: Tensor | None = None,
        every_n_steps: int = 100,
        out_dir: str | Path | None = None,
        max_images: int = 4,
        k: float = 3.0,
        model_attr: str = "student",
        image_key: str = "image",
        tag: str = "norm_maps",
    ) -> None:
        super().__init__(probe_images, every_n_steps, model_attr, image_key)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.max_images, self.k, self.tag = max_images, k, tag
        self.written: list[Path] = []

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out_dir = self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "norm_maps"  # all ranks
        if not trainer.is_global_zero:
            return
        from .maps import compute_maps, display_rgb  # drawing code: imported by the runs that draw
        from .plots import figure_array, plot_maps, save_figure

        model = self.model(pl_module)
        images = self.student_view(pl_module)[: self.max_images]
        rgb = display_rgb(images, model)
        maps = compute_maps(model, images, self.k)
        fig = plot_maps([(f"image {i}", rgb[i], m) for i, m in enumerate(maps)])
        step = trainer.global_step
        image = figure_array(fig)
        sent = [_log_image(logger, self.tag, image, step) for logger in trainer.loggers]
        if self.out_dir is not None or not any(sent):
            self.written.append(save_figure(fig, out_dir / f"{self.tag}_step{step:06d}.png"))


def _log_image(logger: Any, tag: str, image: np.ndarray, step: int) -> bool:
    """Send an (H, W, 3) uint8 image to a logger that takes images; False when it takes none."""
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=tag, images=[image], step=step)
        return True
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, step, dataformats="HWC")
        return True
    return False


def training_facts(trainer: L.Trainer) -> dict[str, Any]:
    """What a model card says about a run: steps, images per step (all devices), resolution, distinct images."""
    facts: dict[str, Any] = {"step": trainer.global_step}
    loader = trainer.train_dataloader
    # A loader built on a batch sampler (the resumable training loader) has its batch size there.
    batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                "batch_size", None)
    if batch_size:
        facts["batch_size"] = batch_size * trainer.world_size * trainer.accumulate_grad_batches
    if getattr(trainer.datamodule, "img_size", None):
        facts["img_size"] = trainer.datamodule.img_size
    if isinstance(getattr(loader, "dataset", None), Sized):
        facts["train_images"] = len(loader.dataset)
    return facts


class RegisterExport(L.Callback):
    """Writes the timm-native export (:func:`retrofit.export`) at the end of fit, or on every improvement.

    With ``monitor`` (a logged metric, checked at each train epoch end and validation end) the export
    is replaced whenever the metric improves (``mode`` min or max); if it was never logged, the final
    model is exported at fit end with a warning, so a run never ends without a model. The model is
    ``pl_module.export_model()`` when the module has one (LoRA merged), else ``getattr(pl_module,
    model_attr)`` (a peft model is merged on a copy). The export's model card records the run (steps,
    images, resolution; backbone and freeze preset of a :class:`RetrofitModule`). With ``push_to_hub``
    (``USER/NAME``) the final export is uploaded at fit end (:func:`retrofit.hub.push_to_hub`; the token
    is checked before training). Only global rank 0 writes and pushes. ``out_dir`` defaults to ``model/`` in
    the run's log directory. The export is built for the training resolution (``img_size`` of the data).
    """

    def __init__(
        self,
        out_dir: str | Path | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        overwrite: bool = True,
        model_attr: str = "student",
        push_to_hub: str | None = None,
        private: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise RetrofitError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.monitor, self.mode = monitor, mode
        self.overwrite, self.model_attr = overwrite, model_attr
        self.push_to_hub, self.private = push_to_hub, private
        self.best_score: float | None = None
        self.exported_step: int | None = None
        self.pushed_url: str | None = None
        self.facts: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        """Several RegisterExports in one Trainer keep their best scores apart in checkpoints."""
        return self._generate_state_key(out_dir=str(self.out_dir), monitor=self.monitor)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse an existing export, the original model's own folder or a push without a token before
        training, not after it."""
        if stage != "fit":
            return
        self.out_dir = self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "model"
        check_free(self.out_dir, self.overwrite)
        model = getattr(pl_module, self.model_attr, None)
        if isinstance(model, nn.Module):
            check_target(model, self.out_dir, getattr(pl_module, "hparams", {}).get("backbone"))
        if self.push_to_hub is not None:
            check_repo(self.push_to_hub)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.facts = {k: v for k, v in training_facts(trainer).items() if k != "step"}

    def _model(self, pl_module: L.LightningModule) -> nn.Module:
        if callable(getattr(pl_module, "export_model", None)):
            return pl_module.export_model()
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise RetrofitError(f"{type(pl_module).__name__} has neither export_model() nor .{self.model_attr}: "
                                "pass model_attr=...")
        return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, **metadata: Any) -> None:
        if trainer.is_global_zero:
            metadata = {**training_facts(trainer), **metadata, "repo_id": self.push_to_hub}
            model = self._model(pl_module)
            if isinstance(pl_module, RetrofitModule):  # it adds its backbone and freeze preset
                pl_module.export(self.out_dir, overwrite=True, model=model, **metadata)
            else:
                export(model, self.out_dir, overwrite=True, **metadata)
        self.exported_step = trainer.global_step

    def _improved(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if self._improved(score):
            self.best_score = score
            self._export(trainer, pl_module, monitor=self.monitor, score=score)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is None or self.best_score is None:
            if self.monitor is not None:
                rank_zero_warn(f"RegisterExport never saw metric {self.monitor!r}: exporting the final model.")
            self._export(trainer, pl_module)
        if self.push_to_hub is not None and trainer.is_global_zero:
            self.pushed_url = push_to_hub(self.out_dir, self.push_to_hub, private=self.private)

    def state_dict(self) -> dict[str, Any]:
        """The best score, and the run's facts for a model card exported later from the checkpoint."""
        return {"best_score": self.best_score, "facts": self.facts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict["best_score"]
        self.facts = state_dict.get("facts", {})

    @staticmethod
    def saved_facts(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """The run's facts a RegisterExport kept in a Lightning checkpoint (images, resolution), for a model card
        exported from it later; empty when the run had none."""
        states = checkpoint.get("callbacks") or {}
        return next((dict(v.get("facts") or {}) for k, v in states.items() if str(k).startswith("RegisterExport")), {})


class StepProgressBar(RichProgressBar):
    """One rich bar over the whole run when ``max_steps`` bounds it: "step 120/1000 (epoch 3)", the time since
    the run started and the time left.

    Lightning's bar counts the batches of one epoch and starts over each epoch, elapsed time and estimate
    included, and reads "Epoch 16/-2" for a run without an epoch count. Here the bar counts optimizer steps,
    from the step a resumed run starts at, and its line fits the terminal (a line wider than the terminal was
    wrapped, and left behind twice when the bar ended). The logger's version number (``v_num``) is left out,
    metric names lose their ``train/`` prefix, and a terminal narrower than 120 columns shows the loss alone.
    A run bounded by epochs gets Lightning's own bar.
    """

    DESCRIPTION_WIDTH = 28  # "step 10000/10000 (epoch 100)"
    TIME_WIDTH = 17  # "0:12:34 • 1:23:45"
    METRICS_WIDTH = 14  # "loss: 0.00123" at a narrow terminal
    _streams: Sequence[tuple[logging.StreamHandler, Any]] = ()  # Lightning's log handlers and their own streams

    @staticmethod
    def _counts_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        logging.getLogger(RANK_ZERO_LOG).addFilter(_not_max_steps_reached)  # once, however many runs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's log lines go to ``sys.stderr`` as it is while the bar shows (in a terminal, rich's proxy
        that prints above the bar): written to the terminal directly, they tore the bar's line."""
        super().on_train_start(trainer, pl_module)
        handlers = [h for name in LIGHTNING_LOGS for h in logging.getLogger(name).handlers
                    if type(h) is logging.StreamHandler and h.stream is not sys.stderr]
        self._streams = [(h, h.setStream(sys.stderr)) for h in handlers]

    def _restore_streams(self) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        self._streams = ()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_streams()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_streams()

    def configure_columns(self, trainer: L.Trainer) -> list:
        if not self._counts_steps(trainer):
            return super().configure_columns(trainer)
        width = get_console().width  # the console the bar draws on (RichProgressBar takes rich's own)
        bar = max(10, min(40, width - self.DESCRIPTION_WIDTH - self.TIME_WIDTH - self.METRICS_WIDTH - 4))
        theme = self.theme
        columns = [
            TextColumn("[progress.description]{task.description}"),
            CustomBarColumn(bar_width=bar, complete_style=theme.progress_bar,
                            finished_style=theme.progress_bar_finished, pulse_style=theme.progress_bar_pulse),
            CustomTimeColumn(style=theme.time),  # elapsed • left
        ]
        return columns + ([ProcessingSpeedColumn(style=theme.processing_speed)] if width >= 120 else [])

    def _describe(self, trainer: L.Trainer) -> None:
        """The run's bar: made on its first step (also when it resumes mid-epoch), moved to the current step."""
        if self.progress is None or self.is_disabled:
            return
        description = f"step {trainer.global_step}/{trainer.max_steps} (epoch {trainer.current_epoch})"
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(description, total=trainer.max_steps,
                                                                completed=trainer.global_step)
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, description=description)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            return
        self._describe(trainer)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        self._describe(trainer)  # the optimizer step is done: global_step counts it
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        short = {name.removeprefix("train/").replace("outlier_fraction", "outliers"): value
                 for name, value in metrics.items()}
        narrow = get_console().width < 120  # the console the bar draws on (RichProgressBar takes rich's own)
        return {k: v for k, v in short.items() if k == "loss"} if narrow and "loss" in short else short


def _not_max_steps_reached(record: logging.LogRecord) -> bool:
    """Lightning's "`Trainer.fit` stopped: `max_steps=N` reached." repeats the bar's last step, and printed in the
    middle of the bar's line it left the bar behind twice."""
    return not record.getMessage().startswith("`Trainer.fit` stopped: `max_steps=")
