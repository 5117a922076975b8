"""Faults made to happen for real: NaN losses and gradients, SIGTERM / Ctrl-C during `retrofit fit`, resume.

Each test checks what the user is left with: the exit status and the one line they read, the files on
disk (a resumable checkpoint, the run folder) and the weights after resuming.
"""

import csv
import io
import logging
import os
import shlex
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import timm
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from safetensors.torch import load_file

from retrofit.api import retrofit
from retrofit.cache import TargetCache
from retrofit.cli import main
from retrofit.faults import NonFiniteError, NonFiniteGuard, batches_done, continue_run
from retrofit.module import RetrofitModule
from retrofit.synthetic import synthetic_images
from retrofit.targets import DenoisedTargets, TargetSettings

from .helpers import tiny_model_dir, write_images
from .test_cli import fit_args

REPO = Path(__file__).resolve().parent.parent
FAST = TargetSettings(num_views=3, num_candidates=8)
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)


def tiny_teacher() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8).eval()


def test_nan_target_stops_at_its_step_and_the_last_good_state_resumes(tmp_path, caplog):
    """A NaN planted in one cached target stops the run at the step that reads it; the state before it resumes."""
    teacher, cache_dir = tiny_teacher(), tmp_path / "cache"
    images = synthetic_images(8, 32, seed=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    cache = TargetCache(cache_dir, teacher, FAST, image_size=32)
    clean = DenoisedTargets(teacher, FAST)(images[:2])
    cache.put(["tensor:0", "tensor:1"], clean)
    poisoned = DenoisedTargets(teacher, FAST)(images[5:6])
    poisoned.features[0, 1, 2, 0] = float("nan")
    cache.put(["tensor:5"], poisoned)
    entry = cache.path("tensor:1")
    data = entry.read_bytes()
    entry.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a flipped bit: corrupt, recomputed on the way
    settings = dict(max_steps=6, batch_size=2, random_crop=False, shuffle=False, lr=1e-2, min_lr=1e-3, targets=FAST,
                    cache_dir=str(cache_dir), default_root_dir=str(tmp_path), **QUIET)

    with caplog.at_level(logging.WARNING, logger="retrofit.faults"), pytest.raises(NonFiniteError) as err:
        retrofit(teacher, images, **settings)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the loss is nan at step 3 (images tensor:4, tensor:5)") and "target" in message
    stopped = tmp_path / "checkpoints" / "stopped-step=2.ckpt"
    assert f"saved {stopped}; resume with: retrofit(..., ckpt_path='{stopped}')" in message
    assert "recomputed and rewrote 1 bad entries (1 corrupt)" in caplog.text  # the end-of-run cache report
    saved = torch.load(stopped, weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())

    cache.path("tensor:5").unlink()  # the fix: the bad entry goes, its target is computed afresh
    model = retrofit(teacher, images, ckpt_path=str(stopped), **settings)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.reg_token, saved["state_dict"]["student.reg_token"])  # it went on training


def test_nan_weight_stops_at_the_first_step_and_saves_nothing(tmp_path):
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.blocks[1].mlp.fc2.bias[3] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        retrofit(teacher, synthetic_images(4, 32, seed=1), max_steps=2, batch_size=2, targets=FAST,
                 default_root_dir=str(tmp_path), **QUIET)
    message = str(err.value)
    assert "\n" not in message and message.startswith("the loss is nan at step 1")
    assert "weight teacher.blocks.1.mlp.fc2.bias is not finite" in message and "no checkpoint to resume from" in message
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_overflow_is_named_with_its_fix(tmp_path):
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.blocks[0].mlp.fc2.weight.mul_(1e6)  # finite in float32, beyond float16's 65504
    with pytest.raises(NonFiniteError, match="float16 overflow under precision 16-mixed: use bf16-mixed"):
        retrofit(teacher, synthetic_images(4, 32, seed=1), max_steps=2, batch_size=2, targets=FAST,
                 precision="16-mixed", accelerator="gpu", devices=1, default_root_dir=str(tmp_path),
                 enable_progress_bar=False, enable_model_summary=False)


def test_nan_gradient_stops_before_the_optimizer_applies_it():
    import lightning as L

    from retrofit.data import RetrofitDataModule

    module = RetrofitModule(tiny_teacher(), lr=1e-2, min_lr=1e-3, targets=FAST)
    module.student.reg_token.register_hook(lambda grad: grad * float("inf"))  # a gradient that overflows
    before = module.student.reg_token.detach().clone()
    data = RetrofitDataModule.from_tensor(synthetic_images(4, 32, seed=1), img_size=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=2, callbacks=[NonFiniteGuard()], logger=False, enable_checkpointing=False, **QUIET)
    with pytest.raises(NonFiniteError, match=r"^the gradient of student\.reg_token is not finite at step 1 "):
        trainer.fit(module, datamodule=data)
    assert torch.equal(module.student.reg_token, before)


# ---- signals on a real `retrofit fit` ------------------------------------------------------------------

STOP_AT, STEPS = 6, 8  # 8 images in batches of 2: the signal lands in the middle of the second epoch
SIGNALS = {"sigterm": (signal.SIGTERM, False), "sigterm-group": (signal.SIGTERM, True), "ctrl-c": (signal.SIGINT, True)}


def signal_config(path: Path, *signals: tuple[int, bool]) -> Path:
    callbacks = [{"class_path": "tests.signals.SignalAt", "init_args": {"step": STOP_AT, "signum": int(s), "group": g}}
                 for s, g in signals]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


@pytest.fixture(scope="module")
def signal_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``retrofit fit`` subprocesses (2 DataLoader workers) signalled at step 6, run side by side, each in
    its own process group; and the same fit uninterrupted, in process."""
    root = tmp_path_factory.mktemp("signals")
    torch.manual_seed(0)
    ws = {"root": root, "model": tiny_model_dir(root / "original"), "images": write_images(root / "images", 8)}
    common = ["--data.batch_size", "2", "--data.num_workers", "2", "--trainer.max_steps", str(STEPS)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {}
    for name, (signum, group) in SIGNALS.items():
        config = signal_config(root / f"{name}.yaml", (signum, group))
        args = fit_args(ws, name, "--config", str(config), *common)
        procs[name] = subprocess.Popen([sys.executable, "-m", "retrofit.cli", *args], cwd=REPO, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
    assert main(fit_args(ws, "whole", *common)) == 0
    runs = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    return {"ws": ws, "runs": runs, "whole": root / "whole" / "lightning_logs" / "version_0"}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_stops_with_one_line_a_checkpoint_and_an_exact_resume(name: str, signal_runs: dict) -> None:
    signum, _ = SIGNALS[name]
    code, out, err = signal_runs["runs"][name]
    run = signal_runs["ws"]["root"] / name / "lightning_logs" / "version_0"
    stopped = run / "checkpoints" / f"stopped-step={STOP_AT}.ckpt"
    assert code == 128 + signum, err
    assert "Traceback" not in err + out and "DataLoader worker" not in err + out
    lines = [line for line in err.splitlines() if line.startswith("retrofit:")]
    what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert len(lines) == (2 if signum == signal.SIGINT else 1), lines  # Ctrl-C is acknowledged when pressed
    assert lines[-1].startswith(f"retrofit: error: stopped by {what} after step {STOP_AT} of {STEPS}: saved {stopped}")
    assert stopped.is_file() and not (run / "model").exists()

    command = lines[-1].split("resume with: ", 1)[1]
    assert command == f"retrofit fit --config {run / 'config.yaml'} --ckpt_path {stopped}"
    with redirect_stdout(io.StringIO()) as printed:
        assert main(shlex.split(command)[1:]) == 0
    assert printed.getvalue().startswith(f"step {STEPS}/{STEPS} (epoch 1) ━")  # the run's bar, from where it resumed
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # the resumed run continued in place
    with (run / "metrics.csv").open(newline="") as rows:  # Lightning's CSVLogger would have deleted the first part
        assert [int(row["step"]) for row in csv.DictReader(rows)] == list(range(STEPS)), name
    resumed = load_file(run / "model" / "model.safetensors")
    whole = load_file(signal_runs["whole"] / "model" / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole), name


def test_second_ctrl_c_stops_at_once_and_names_the_latest_checkpoint(tmp_path, capsys) -> None:
    ws = {"root": tmp_path, "model": tiny_model_dir(tmp_path / "original"), "images": write_images(tmp_path / "i", 8)}
    config = signal_config(tmp_path / "twice.yaml", (signal.SIGINT, False), (signal.SIGINT, False))
    args = fit_args(ws, "run", "--config", str(config), "--data.batch_size", "2", "--trainer.max_steps", "8")
    assert main(args) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    checkpoints = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    assert line.startswith(f"retrofit: error: stopped at once by Ctrl-C (SIGINT) at step {STOP_AT}: no checkpoint "
                           f"at this step; the latest is {checkpoints / 'epoch=0-step=4.ckpt'}; resume with: ")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt"]


def test_resuming_from_a_missing_checkpoint_is_one_line(tmp_path, capsys) -> None:
    ws = {"root": tmp_path, "model": tiny_model_dir(tmp_path / "original"), "images": write_images(tmp_path / "i", 2)}
    assert main(fit_args(ws, "run", "--ckpt_path", str(tmp_path / "gone.ckpt"))) == 1
    err = capsys.readouterr().err
    assert err == f"retrofit: error: checkpoint {tmp_path / 'gone.ckpt'} does not exist: pass a .ckpt from a run's " \
                  "checkpoints folder.\n"


class _Linear(L.LightningModule):
    """The smallest module a Trainer can fit: one linear layer on random vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.done: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.done.append(batches_done(self.trainer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_batches_done_counts_the_batches_of_the_epoch(tmp_path) -> None:
    """The Lightning-internal count the resumable loader relies on (faults.batches_done)."""
    module = _Linear()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **QUIET).fit(
        module, torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=2))
    assert module.done == [1, 2, 3, 1, 2, 3]


def test_a_resumed_run_continues_its_logs_in_place(tmp_path) -> None:
    """continue_run points both folder loggers at the checkpoint's run folder, and the CSV one appends."""
    run = tmp_path / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "metrics.csv").write_text("loss,step\n1.0,0\n")  # as Lightning writes it: columns sorted
    csv_logger, tensorboard = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    continue_run(SimpleNamespace(loggers=[csv_logger, tensorboard]), run / "checkpoints" / "last.ckpt")
    assert Path(csv_logger.log_dir) == Path(tensorboard.log_dir) == run
    csv_logger.log_metrics({"loss": 0.5}, step=1)
    csv_logger.save()
    assert (run / "metrics.csv").read_text().splitlines() == ["loss,step", "1.0,0", "0.5,1"]
