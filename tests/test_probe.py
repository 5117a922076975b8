"""Linear-probe segmentation: a colour-separable two-class task reaches high mIoU on frozen features."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from retrofit import RetrofitError
from retrofit.evaluate import evaluate_probe
from retrofit.evaluate.probe import _scores

from .helpers import BACKGROUND_RGB, OBJECT_RGB, write_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    # Random init on purpose: a linear probe must read colour off any features that keep it.
    return timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8, depth=1).eval()


def test_probe_segments_squares(tmp_path, model):
    palette = (OBJECT_RGB, BACKGROUND_RGB)
    train = write_scenes(tmp_path / "train", 16, seed=0, palette=palette)
    val = write_scenes(tmp_path / "val", 8, seed=1, palette=palette)
    result = evaluate_probe(model, train, val, num_classes=2, epochs=20, lr=3e-2, batch_size=8)
    background, square = result["per_class_iou"]
    assert result["miou"] == pytest.approx((background + square) / 2)
    assert result["miou"] > 0.8 and square > 0.7
    assert result["accuracy"] > 0.9
    assert (result["n_train"], result["n_val"]) == (16, 8)
    once = evaluate_probe(model, train, val, num_classes=2, epochs=1, lr=3e-2, batch_size=8)
    assert once["train_loss"] > result["train_loss"] and once["miou"] < result["miou"]


def test_scores_known_answer():
    # A head that says class 0 everywhere; per mask 8 pixels ignored, 12 of class 1, 44 of class 0.
    head = nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    masks = torch.zeros(2, 8, 8, dtype=torch.int16)
    masks[:, :4, :4] = 1
    masks[:, 0, :] = 255
    scores = _scores(head, torch.randn(2, 2, 2, 4), masks, num_classes=3, batch_size=1)
    assert scores["per_class_iou"] == pytest.approx([44 / 56, 0.0, None])  # class 2: in neither, so left out
    assert scores["miou"] == pytest.approx(22 / 56)
    assert scores["accuracy"] == pytest.approx(44 / 56)


def test_probe_rejects_bad_input(tmp_path, model):
    root = write_scenes(tmp_path, 2, seed=2)
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "masks" / "1.png")
    with pytest.raises(RetrofitError, match="mask of 1.png has class 7 but num_classes=2") as e:
        evaluate_probe(model, root, root, num_classes=2, epochs=1)
    assert "\n" not in str(e.value)
    with pytest.raises(RetrofitError, match="need num_classes >= 2"):
        evaluate_probe(model, root, root, num_classes=1)
