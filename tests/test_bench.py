"""The benchmark scripts run end to end on a tiny model, so that the one-shot GPU check works when a GPU is lent.

Their timings are not checked here (that is what the scripts are for); their quality columns are.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(*command: str) -> str:
    done = subprocess.run(command, cwd=BENCH, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def row(output: str, start: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(f"| {start}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_gpu_check_smoke_prints_its_table() -> None:
    out = run("bash", "gpu_check.sh", "--smoke")
    step = row(out, "test_vit 64px b4, default preset")
    assert float(step[1]) > 0 and float(step[2]) > 0  # s/step, images/s
    quality = row(out, "targets: cos to the twin")
    bf16, fp32 = (tuple(map(float, re.findall(r"\d\.\d+", cell))) for cell in quality[1:3])
    assert min(fp32) > 0.8 and all(abs(a - b) < 0.05 for a, b in zip(bf16, fp32, strict=True))
    assert "CUDA only" in row(out, "16-mixed")[-1]
    plain, checkpointed = row(out, "test_vit 64px b4, grad ckpt False"), row(out, "test_vit 64px b4, grad ckpt True")
    assert float(checkpointed[1]) > 0 and float(plain[1]) > 0
    assert "GPU-hours" in row(out, "projection")[1]


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
