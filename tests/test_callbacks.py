"""Callbacks inside real Trainer.fit runs (CPU, a few steps, tiny ViTs)."""

import io
import logging
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader

from retrofit import RetrofitError, add_registers, load, patch_features
from retrofit._export import export_config
from retrofit.callbacks import ArtifactMonitor, NormMapLogger, RegisterExport, StepProgressBar
from retrofit.metrics import FeatureFidelity, outlier_mask

from .helpers import planted_vit

SIZE = 48


class Tiny(L.LightningModule):
    """The attribute names of RetrofitModule: a frozen teacher with one artifact, a student with registers.

    The student learns to match the teacher's features with the planted channel removed.
    """

    def __init__(self, targets=None) -> None:
        super().__init__()
        self.teacher = planted_vit(SIZE).requires_grad_(False)
        self.student = add_registers(self.teacher, 2, seed=0).train()
        if targets is not None:
            self.targets = targets

    def training_step(self, batch, batch_idx):
        feats = patch_features(self.student, batch["image"])
        with torch.no_grad():
            goal = patch_features(self.teacher, batch["image"])
            goal[..., 0] = 0
        loss = torch.nn.functional.mse_loss(feats, goal)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=3e-3)


def loader(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    items = [{"image": torch.randn(3, SIZE, SIZE, generator=g), "key": str(i)} for i in range(n)]
    return DataLoader(items, batch_size=batch_size)


def fit(module: L.LightningModule, callbacks: list, tmp_path, max_steps: int = 4, **kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path,
        enable_checkpointing=False, enable_model_summary=False,
        **({"logger": CSVLogger(tmp_path), "enable_progress_bar": False} | kwargs),
    )
    trainer.fit(module, loader())
    return trainer


def test_artifact_monitor_logs_what_the_metrics_say(tmp_path):
    module = Tiny()
    monitor = ArtifactMonitor(every_n_steps=2)
    trainer = fit(module, [monitor], tmp_path)
    assert [h["step"] for h in monitor.history] == [0, 2, 4]
    assert monitor.history[0]["outlier_high"] == pytest.approx(1 / 9)  # the planted token, before training

    probe = next(iter(loader()))["image"]  # the first training batch
    module.student.eval()
    with torch.no_grad():
        feats = patch_features(module.student, probe)
        reference = patch_features(module.teacher, probe)
    fidelity = FeatureFidelity()(feats, reference)
    last = monitor.history[-1]
    assert last["outlier_high"] == pytest.approx(outlier_mask(feats).float().mean().item())
    assert last["fidelity_mean"] == pytest.approx(fidelity["mean"].item(), abs=1e-5)
    assert last["fidelity_p5"] == pytest.approx(fidelity["p5"].item(), abs=1e-5)
    assert last["norm_max"] == pytest.approx(feats.norm(dim=-1).max().item(), rel=1e-5)
    assert trainer.callback_metrics["artifacts/fidelity_mean"].item() == pytest.approx(last["fidelity_mean"])
    assert module.student.training is False  # restored to the mode it had (eval here, set above)


def test_monitor_prefers_targets_and_stops_early(tmp_path, caplog):
    calls = []

    def targets(images, margin):
        calls.append(margin)
        with torch.no_grad():
            return SimpleNamespace(features=-patch_features(module.teacher, images))

    module = Tiny(targets)
    monitor = ArtifactMonitor(every_n_steps=2, stop_outlier_fraction=1.0, stop_fidelity=-1.0)
    with caplog.at_level(logging.INFO):
        trainer = fit(module, [monitor], tmp_path, max_steps=10)
    assert trainer.global_step == 2  # targets met at the first check after training started
    last = monitor.history[-1]
    assert f"ArtifactMonitor stopped the run at step 2 of 10: high-norm outliers {100 * last['outlier_high']:.2f}% " \
           f"<= 100.00% and mean fidelity {last['fidelity_mean']:.3f} >= -1.000." in caplog.messages  # says why
    assert calls == [0]  # reference computed once
    assert monitor.history[0]["fidelity_mean"] < -0.99  # the untrained student vs the negated teacher


def test_norm_map_logger_files_and_image_loggers(tmp_path):
    class ImageLogger(Logger):
        name, version = "images", 0
        images: list = []

        def log_image(self, key, images, step):
            self.images.append((key, step, images[0]))

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    probe = torch.randn(2, 3, SIZE, SIZE)
    files = NormMapLogger(probe_images=probe, every_n_steps=2, out_dir=tmp_path / "maps")
    fit(Tiny(), [files], tmp_path, max_steps=2, logger=False)
    assert [p.name for p in files.written] == [f"norm_maps_step{s:06d}.png" for s in (0, 2)]
    assert all(p.stat().st_size > 10_000 for p in files.written)

    logger = ImageLogger()
    fit(Tiny(), [NormMapLogger(every_n_steps=2)], tmp_path / "run2", max_steps=2, logger=logger)
    assert [(key, step) for key, step, _ in logger.images] == [("norm_maps", 0), ("norm_maps", 2)]
    image = logger.images[0][2]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8" and image.std() > 10
    assert not (tmp_path / "run2" / "norm_maps").exists()  # the logger took the images


def test_register_export_final_and_best(tmp_path):
    module = Tiny()
    fit(module, [RegisterExport(tmp_path / "final")], tmp_path, max_steps=2)
    loaded = load(tmp_path / "final")
    x = torch.randn(1, 3, SIZE, SIZE)
    module.student.eval()
    with torch.no_grad():
        assert torch.allclose(patch_features(loaded, x), patch_features(module.student, x), atol=1e-5)
    assert export_config(tmp_path / "final")["retrofit"]["num_registers"] == 2

    best = RegisterExport(tmp_path / "best", monitor="train_loss", mode="min")
    fit(Tiny(), [best], tmp_path)  # 2 epochs of 2 steps
    meta = export_config(tmp_path / "best")["retrofit"]
    assert meta["score"] == pytest.approx(best.best_score) and meta["monitor"] == "train_loss"
    assert meta["step"] == best.exported_step

    with pytest.raises(RetrofitError, match="already exists and is not empty"):
        fit(Tiny(), [RegisterExport(tmp_path / "best", overwrite=False)], tmp_path)


def test_with_retrofit_module_lora(tmp_path):
    from retrofit.module import RetrofitModule

    def run(callbacks: list, root) -> RetrofitModule:
        module = RetrofitModule(planted_vit(SIZE), num_registers=2, freeze="lora", lr=1e-3,
                                targets={"num_views": 2})
        fit(module, callbacks, root, max_steps=2, logger=False)
        return module

    torch.manual_seed(0)
    monitor = ArtifactMonitor(every_n_steps=2)
    watched = run([monitor, RegisterExport(tmp_path / "export")], tmp_path / "a")
    torch.manual_seed(0)
    plain = run([], tmp_path / "b")
    # the monitor's reference came from the module's denoised targets without moving their random views
    assert torch.equal(watched.targets.get_rng_state(), plain.targets.get_rng_state())
    assert monitor.history[0]["outlier_high"] == pytest.approx(1 / 9)
    assert 0.5 < monitor.history[0]["fidelity_mean"] <= 1.0
    first = monitor.history[0]  # the planted token, and what attention spread around it
    assert first["fidelity_artifacts"] < first["fidelity_elsewhere"] and "fidelity_neighbours" in first
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = patch_features(watched.export_model(), x)
    assert torch.allclose(patch_features(load(tmp_path / "export"), x), expected, atol=1e-5)


def test_register_export_card_and_push(tmp_path, fake_hub, monkeypatch):
    callback = RegisterExport(tmp_path / "exp", push_to_hub="user/tiny")
    fit(Tiny(), [callback], tmp_path, max_steps=2)
    info = export_config(tmp_path / "exp")["retrofit"]
    assert (info["step"], info["batch_size"], info["train_images"]) == (2, 4, 8)
    assert 'create_model("hf-hub:user/tiny"' in (tmp_path / "exp" / "README.md").read_text()
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "user/tiny" and callback.pushed_url.endswith("/commit/0123abc")
    assert callback.state_dict()["facts"] == {"batch_size": 4, "train_images": 8}

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("retrofit.hub.get_token", lambda: None)
    with pytest.raises(RetrofitError, match="needs a Hugging Face token"):
        fit(Tiny(), [RegisterExport(tmp_path / "exp2", push_to_hub="user/tiny")], tmp_path)
    assert not (tmp_path / "exp2").exists()  # refused before training, not after it


class BarWatch(L.Callback):
    """What the progress bar shows after each step: (tasks, total, completed, started at)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        tasks = trainer.progress_bar_callback.progress.tasks
        self.seen.append((len(tasks), tasks[-1].total, tasks[-1].completed, tasks[-1].start_time))


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return starts its line over; colours are dropped."""
    return [line.rsplit("\r", 1)[-1] for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).split("\n")]


def test_step_progress_bar_counts_the_whole_run_once_and_log_lines_print_above_it(tmp_path):
    printed = io.StringIO()
    watch = BarWatch()
    bar = StepProgressBar(console_kwargs={"file": printed, "width": 80, "force_terminal": True})
    monitor = ArtifactMonitor(every_n_steps=4, stop_outlier_fraction=1.0)  # stops after step 4 of 6, and says so
    fit(Tiny(), [bar, watch, monitor], tmp_path, max_steps=6, enable_progress_bar=True)  # 2 batches per epoch
    assert [(n, total, done) for n, total, done, _ in watch.seen] == [(1, 6, step) for step in range(1, 5)]
    assert len({started for *_, started in watch.seen}) == 1  # one bar, never reset at an epoch (nor its clock)
    shown = [line for line in screen(printed.getvalue()) if line.strip()]
    assert "ArtifactMonitor stopped the run at step 4 of 6: high-norm outliers " in shown[0]
    assert shown[-1].startswith("step 4/6 (epoch 1) ━") and len(shown[-1]) <= 80  # the bar, once, whole
    assert len(shown) == 3 and not any(line.startswith("step ") for line in shown[:-1])  # the stop line: 2 at 80
