"""`retrofit demo`: planted artifacts go away, the outputs land where the README says, the export reloads."""

import json
import time
from pathlib import Path

import torch

from retrofit import count_registers, load, patch_features
from retrofit.cli import main
from retrofit.demo import PATCH, SIZE, demo_models


def test_demo_removes_synthetic_artifacts_and_writes_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    start = time.perf_counter()
    assert main(["demo", "--out", str(out), "--steps", "50", "--num_images", "16"]) == 0
    elapsed = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["held_out"]) == {str(SIZE), str(SIZE * 3 // 2)}  # trained size, and one it never saw
    for scores in metrics["held_out"].values():
        before, after = scores["before"], scores["after"]
        assert before["outlier_fraction"] >= 0.01  # the planted artifacts are there ...
        assert after["outlier_fraction"] <= before["outlier_fraction"] / 4  # ... and mostly gone after 50 steps
        assert after["cosine_artifacts"] > before["cosine_artifacts"] + 0.5  # repaired, not just hidden
        assert after["cosine_all"] > 0.95 and after["cosine_neighbours"] > before["cosine_neighbours"]
    assert 0.5 * elapsed <= metrics["wall_time_s"] <= elapsed  # the whole demo, as the command took it

    report = json.loads((out / "maps" / "diagnose.json").read_text())
    assert [m["num_registers"] for m in report["models"]] == [0, 4]
    assert len(list((out / "maps").glob("00?_image?.png"))) == metrics["held_out_images"]
    model = load(out / "model")
    assert count_registers(model) == 4 and not (out / "target_cache").exists()

    planted, truth = demo_models()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():  # the export is the retrofitted planted model, not the clean twin
        assert patch_features(model, x).shape == (2, SIZE // PATCH, SIZE // PATCH, 64)
        assert not torch.allclose(patch_features(model, x), patch_features(truth, x))

    assert main(["demo", "--out", str(out), "--steps", "1", "--overwrite", "false"]) == 1  # results are kept
    assert (out / "metrics.json").is_file()
