"""Evaluation data: folder, JSON and Hugging Face loaders, and boxes/masks following the image geometry."""

import json

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from retrofit import RetrofitError
from retrofit.evaluate import box_dataset, mask_dataset
from retrofit.evaluate.datasets import batches

from .helpers import square_scene, write_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_vit", pretrained=False, img_size=40, patch_size=8, depth=1).eval()


def test_boxes_and_masks_follow_resize_and_centre_crop(tmp_path, model):
    # 120x80 image -> short side 40 (scale 0.5) -> 60x40 -> centre crop 40x40 drops 10 px left and right
    rng = np.random.default_rng(0)
    image, _, _ = square_scene(rng, 120, 80)
    mask = np.zeros((80, 120), np.uint8)
    mask[20:60, 30:70] = 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image.save(tmp_path / "images" / "a.jpg")
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"a.jpg": [[30, 20, 70, 60], [0, 0, 10, 10]]}))

    (_, x, [b]), = batches(box_dataset(tmp_path / "images", boxes=tmp_path / "boxes.json"), model, 40)
    assert x.shape == (1, 3, 40, 40)
    assert b.tolist() == [[5.0, 10.0, 25.0, 30.0], [0.0, 0.0, 0.0, 5.0]]  # the second box was cropped away
    (_, _, [m]), = batches(mask_dataset(tmp_path), model, 40)
    rows, cols = torch.nonzero(m == 1, as_tuple=True)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (5, 10, 25, 30)
    assert set(m.unique().tolist()) == {0, 1}  # nearest-neighbour: no blended labels


def test_folder_layouts_agree(tmp_path, model):
    root = write_scenes(tmp_path, 3, seed=1)
    boxes = box_dataset(root / "images")
    masks = mask_dataset(root)
    assert boxes.keys == masks.keys == ["0.png", "1.png", "2.png"]
    for (_, image, box), (_, _, mask) in zip(boxes, masks, strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [[cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]]
        assert image.size == (64, 64)


def test_xywh_reads_like_xyxy(tmp_path):
    write_scenes(tmp_path, 1, seed=2)
    (x0, y0, x1, y1), = json.loads((tmp_path / "images" / "boxes.json").read_text())["0.png"]
    (tmp_path / "coco.json").write_text(json.dumps({"0.png": [[x0, y0, x1 - x0, y1 - y0]]}))
    _, _, coco = box_dataset(tmp_path / "images", boxes=tmp_path / "coco.json", box_format="xywh")[0]
    assert coco.tolist() == [[x0, y0, x1, y1]]


def test_hf_save_to_disk_boxes_and_splits(tmp_path):
    rng = np.random.default_rng(3)
    scenes = [square_scene(rng) for _ in range(3)]
    ds = datasets.Dataset.from_dict(
        {
            "image": [s[0] for s in scenes],
            "objects": [{"bbox": [[b[0], b[1], b[2] - b[0], b[3] - b[1]]], "category": [0]} for _, b, _ in scenes],
        },
        features=datasets.Features({
            "image": datasets.Image(),
            "objects": {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                        "category": datasets.Sequence(datasets.Value("int64"))},
        }),
    )
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(tmp_path / "hf")
    data = box_dataset(tmp_path / "hf", box_format="xywh", split="validation")
    assert len(data) == 3
    for (_, image, boxes), (orig, box, _) in zip(data, scenes, strict=True):
        assert boxes.tolist() == [box]
        assert np.array_equal(np.asarray(image), np.asarray(orig))
    with pytest.raises(RetrofitError, match="has splits train, validation: choose one with split="):
        box_dataset(tmp_path / "hf")
    with pytest.raises(RetrofitError, match=r"no column 'boxes' \(its columns: image, objects\): set boxes_column to "
                       r"one of image, objects\.$"):
        box_dataset(tmp_path / "hf", split="train", boxes_column="boxes.bbox")


def test_hf_imagefolder_masks(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    root = write_scenes(tmp_path / "data", 2, seed=4)
    (root / "images" / "boxes.json").unlink()
    (root / "masks").rename(root / "labels")
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"images/{k}.png", "mask_file_name": f"labels/{k}.png"}) + "\n"
                for k in range(2))
    )
    hf = mask_dataset(root)
    folder = mask_dataset(root / "images", masks=root / "labels")
    assert len(hf) == len(folder) == 2
    for (_, hf_image, hf_mask), (_, image, mask) in zip(hf, folder, strict=True):
        assert torch.equal(hf_mask, mask) and mask.sum() > 0
        assert np.array_equal(np.asarray(hf_image), np.asarray(image))


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_errors(tmp_path):
    root = write_scenes(tmp_path, 2, seed=5)
    with pytest.raises(RetrofitError, match="boxes file .*missing.json does not exist") as e:
        box_dataset(root / "images", boxes=root / "missing.json")
    _one_line(e)
    (root / "bad.json").write_text(json.dumps({"0.png": [[10, 10, 5, 20]]}))
    with pytest.raises(RetrofitError, match="empty or inverted boxes") as e:
        box_dataset(root / "images", boxes=root / "bad.json")[0]
    _one_line(e)
    (root / "gone.json").write_text(json.dumps({"nothere.png": [[0, 0, 5, 5]]}))
    with pytest.raises(RetrofitError, match="are not in") as e:
        box_dataset(root / "images", boxes=root / "gone.json")
    _one_line(e)

    Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "masks" / "1.png")  # wrong size
    with pytest.raises(RetrofitError, match="is 64x32 but its image is 64x64") as e:
        mask_dataset(root)[1]
    _one_line(e)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "masks" / "1.png")  # RGB, not indices
    with pytest.raises(RetrofitError, match="not single-channel class indices") as e:
        mask_dataset(root)[1]
    _one_line(e)
    (root / "masks" / "1.png").unlink()
    with pytest.raises(RetrofitError, match="1 images in .* have no mask .*first: 1.png") as e:
        mask_dataset(root)
    _one_line(e)
