"""The benchmark scripts run end to end on a tiny model, so that the one-shot GPU check works when a GPU is lent.

Their timings are not checked here (that is what the scripts are for); their quality columns are, and the
figures derived from timings (images/s, the projected GPU-hours) are checked against the timings printed.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(*command: str, **env: str) -> str:
    done = subprocess.run(command, cwd=BENCH, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def row(output: str, start: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(f"| {start}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def per_second(cells: list[str], batch: int = 4) -> None:
    """A step row's images/s is its batch over its s/step, within the rounding of both as printed (0.1, 0.001)."""
    seconds, images = float(cells[1]), float(cells[2])
    assert batch / (seconds + 0.0005) - 0.05 <= images <= batch / max(seconds - 0.0005, 1e-9) + 0.05, cells


def test_gpu_check_smoke_prints_its_table() -> None:
    # PYTHON picks the interpreter: the python on PATH (here not this venv's) would not have retrofit
    out = run("bash", "gpu_check.sh", "--smoke", PYTHON=sys.executable)
    step = row(out, "test_vit 64px b4, default preset")
    per_second(step)
    hours = float(row(out, "projection")[1].split()[0])
    assert hours == pytest.approx(1000 * float(step[1]) / 3600, abs=0.005 + 1000 * 0.0005 / 3600)  # 1000 steps
    quality = row(out, "targets: cos to the twin")
    bf16, fp32 = (tuple(map(float, re.findall(r"\d\.\d+", cell))) for cell in quality[1:3])
    assert min(fp32) > 0.8 and all(abs(a - b) < 0.05 for a, b in zip(bf16, fp32, strict=True))
    assert "CUDA only" in row(out, "16-mixed")[-1]
    for checkpointing in (False, True):
        per_second(row(out, f"test_vit 64px b4, grad ckpt {checkpointing}"))
    assert row(out, "projection")[1].endswith(" GPU-hours on this device")


def test_gpu_check_without_retrofit_says_how_to_point_it_at_the_venv() -> None:
    done = subprocess.run(["bash", "gpu_check.sh"], cwd=BENCH, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/bin/false"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("gpu_check.sh: '/bin/false' cannot import retrofit: activate its venv or set "
                           "PYTHON=/path/to/venv/bin/python\n")


def test_train_step_default_row_beats_naive_targets() -> None:
    out = run(sys.executable, "train_step.py", "--model", "test_vit", "--img-size", "64", "--repeats", "1",
              "--batch", "4", "--epoch-batches", "1", "--only", "default")
    naive, default = row(out, "naive"), row(out, "default")
    naive_cos, _, _ = naive[-1].split(" / ")
    default_cos, default_art, left = default[-1].split(" / ")
    assert float(default_cos) > float(naive_cos) and float(default_art) > 0.5 and left == "0.00%"
    phases = [row(out, name) for name in ("teacher targets", "student forward", "student backward")]
    assert abs(sum(int(p[2].rstrip("%")) for p in phases) - 100) <= 2
    assert "later / first" in out


def test_acceptance_table_checks_each_form_against_the_thresholds(tmp_path: Path) -> None:
    def lines(form: str, cos_artifacts: float, stream: float, no_harm_p5: float | None = None) -> list[str]:
        base = {"settings": {}, "form": form, "found": "artifacts build in block 4, 4 register neurons",
                "outliers": 0.0, "cos_p5": 0.99, "cos_neighbours": 0.99, "cos_elsewhere": 0.99}
        rows = [{"run": run, "set": s, "wall_s": 90.0, **base, "stream_outliers": stream if run == "defaults" else 0.02,
                 "cos": 0.99, "cos_artifacts": cos_artifacts if run == "defaults" else 0.1}
                for run in ("planted, before", "test-time registers, no training", "defaults")
                for s in ("held-out 112px", "held-out 168px", "training crops")]
        if no_harm_p5 is not None:
            rows += [{**base, "run": "no harm: unplanted DINOv2, defaults", "set": s, "wall_s": 60.0,
                      "stream_outliers": 0.0, "cos": 0.995, "cos_p5": no_harm_p5}
                     for s in ("held-out 112px", "held-out 168px")]
        return [json.dumps(r) for r in rows]

    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(lines("good", 0.95, 0.0, no_harm_p5=0.96) + lines("weak", 0.85, 0.0)
                              + lines("leaky", 0.95, 0.006) + lines("weak", 0.91, 0.0)) + "\n")  # a rerun replaces
    out = run(sys.executable, "acceptance.py", str(path))
    assert [row(out, form)[-1] for form in ("good", "weak", "leaky")] == ["yes", "yes", "**no**"]
    assert row(out, "good")[4:6] == ["0.00% / 0.00%", "0.00% / 0.00%"]
    assert "0.995 mean, 0.960 p5" in out and out.rstrip().endswith("3 of 4 pass.")
    missing = subprocess.run([sys.executable, "acceptance.py", str(tmp_path / "none.jsonl")], cwd=BENCH,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.splitlines()[-1].endswith(
        "none.jsonl; write it with real_weights.py --out FILE")
