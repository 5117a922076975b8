"""Every example script runs as its docstring says, here on a tiny test_vit and made-up images."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from retrofit import count_registers, load

from .helpers import SIZE, tiny_model_dir, write_images

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("examples")
    torch.manual_seed(0)
    images = write_images(root / "images", 6)
    (root / "boxes.json").write_text(json.dumps({p.name: [[8, 8, 40, 40]] for p in images.glob("*.png")}))
    return {"root": root, "model": tiny_model_dir(root / "original"), "images": images}


def test_python_api_then_diagnose_and_evaluate(inputs, monkeypatch, capsys) -> None:
    out = inputs["root"] / "retrofitted"
    run_example("retrofit_python_api.py", str(inputs["model"]), str(inputs["images"]), str(out),
                "--img-size", str(SIZE), "--steps", "2", "--batch-size", "3", "--registers", "2",
                monkeypatch=monkeypatch)
    assert count_registers(load(out)) == 2
    printed = capsys.readouterr()
    assert "timm reload gives identical features: True" in printed.out
    assert re.search(r"^step [12]/2 \(epoch 0\) ━", printed.out, re.M) and "Epoch" not in printed.out + printed.err

    report_dir = inputs["root"] / "diagnose"
    run_example("diagnose_and_evaluate.py", str(inputs["model"]), str(out), str(inputs["images"]),
                "--boxes", str(inputs["root"] / "boxes.json"), "--out", str(report_dir), monkeypatch=monkeypatch)
    report = json.loads((report_dir / "diagnose.json").read_text())
    assert [m["num_registers"] for m in report["models"]] == [0, 2]
    assert len(list(report_dir.glob("*.png"))) >= 6
    printed = capsys.readouterr().out
    assert "original: LOST CorLoc" in printed and "retrofitted: LOST CorLoc" in printed


def test_lightning_callbacks(inputs, monkeypatch, capsys) -> None:
    out = inputs["root"] / "run"
    run_example("lightning_callbacks.py", str(inputs["model"]), str(inputs["images"]), str(out),
                "--img-size", str(SIZE), "--steps", "2", "--every", "1", "--batch-size", "3",
                monkeypatch=monkeypatch)
    assert count_registers(load(out / "model")) == 4
    assert len(list((out / "norm_maps").glob("*.png"))) >= 2
    printed = capsys.readouterr()
    assert "outlier_high: step 0" in printed.out
    assert re.search(r"^step [12]/2 \(epoch 0\) ━", printed.out, re.M) and "Epoch" not in printed.out + printed.err
