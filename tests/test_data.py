"""RetrofitDataModule: every image once with stable keys, exact normalisation, margin crops, bad files skipped."""

import logging
from collections import Counter
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from retrofit import RetrofitError
from retrofit.data import RetrofitDataModule
from retrofit.images import decode_rgb, eval_transform, open_rgb

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_vit() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, pretrained_cfg_overlay=dict(mean=MEAN, std=STD))


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (48, 40), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, **save)
    return path


def noise(path: Path, size: tuple[int, int] = (80, 64), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def batches(dm: RetrofitDataModule, epochs: int = 1) -> list[dict]:
    loader = dm.train_dataloader()
    return [b for _ in range(epochs) for b in loader]


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 pixel values under MEAN/STD."""
    return (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, int]:
    """Nested folder with mixed suffixes; each image is a solid grey whose level names it."""
    names = ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.bmp", "sub/deeper/e.tiff", "f.jpeg"]
    levels = {}
    for i, name in enumerate(names):
        levels[name] = 30 + 40 * i
        solid(tmp_path / name, (levels[name],) * 3, lossless=True)  # only webp reads `lossless`
    (tmp_path / "notes.txt").write_text("not an image")
    return levels


def test_folder_yields_every_image_once_with_its_key(tmp_path, folder):
    dm = RetrofitDataModule(str(tmp_path), img_size=32, batch_size=4, num_workers=0, patch_size=16,
                            mean=MEAN, std=STD, seed=1)
    seen = {}
    for batch in batches(dm):
        assert batch.keys() == {"image", "key"} and batch["image"].shape[1:] == (3, 32, 32)
        for key, image in zip(batch["key"], batch["image"], strict=True):
            seen[key] = unnormalise(image).mean().item()
    assert sorted(seen) == sorted(folder)
    for key, level in folder.items():  # the image under each key is that file (jpeg within 2 levels)
        assert seen[key] == pytest.approx(level, abs=2)
    assert dm.num_skipped == 0


def test_normalisation_and_patch_size_come_from_the_backbone(tmp_path):
    solid(tmp_path / "x.png", (200, 100, 50))
    dm = RetrofitDataModule(str(tmp_path), img_size=32, batch_size=1, num_workers=0)
    dm.configure_for(tiny_vit(), margin_patches=1)
    (batch,) = batches(dm)
    assert batch["image"].shape == (1, 3, 32 + 2 * 16, 32 + 2 * 16)
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(batch["image"][0], expected.view(3, 1, 1).expand(3, 64, 64), atol=1e-5)


def test_deterministic_crop_equals_eval_transform_and_margin_surrounds_it(tmp_path):
    path = noise(tmp_path / "n.png")
    model = tiny_vit()
    plain = RetrofitDataModule(str(tmp_path), img_size=32, num_workers=0, random_crop=False)
    plain.configure_for(model)
    (b0,) = batches(plain)
    reference = eval_transform(32, MEAN, STD, "bicubic")(open_rgb(path))
    assert torch.equal(b0["image"][0], reference)
    # Same resize (short side 64) with a one-patch margin: the centre window is the same pixels.
    zoomed = RetrofitDataModule(str(tmp_path), img_size=32, num_workers=0, random_crop=False, crop_pct=0.5)
    wide = RetrofitDataModule(str(tmp_path), img_size=32, num_workers=0, random_crop=False, crop_pct=0.5)
    zoomed.configure_for(model)
    wide.configure_for(model, margin_patches=1)
    (bz,), (bw,) = batches(zoomed), batches(wide)
    assert bw["image"].shape[-2:] == (64, 64)
    assert torch.equal(bw["image"][..., 16:48, 16:48], bz["image"])


def test_random_margin_crops_are_real_contiguous_pixels(tmp_path):
    """Pixels encode their coordinates: every crop is an unresampled 64x64 block, at varied positions."""
    x, y = np.meshgrid(np.arange(96), np.arange(64))
    coords = np.stack([x * 2, y * 3, np.zeros_like(x)], -1).astype(np.uint8)
    for i in range(6):
        Image.fromarray(coords).save(tmp_path / f"{i}.png")
    dm = RetrofitDataModule(str(tmp_path), img_size=32, batch_size=6, num_workers=0, patch_size=16, margin=1,
                            mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest", seed=5)
    (batch,) = batches(dm)
    assert batch["image"].shape == (6, 3, 64, 64)
    px = (batch["image"] * 255).round().long()
    xs, ys = px[:, 0] // 2, px[:, 1] // 3
    assert torch.equal(ys, torch.arange(64).view(1, 64, 1).expand(6, 64, 64))  # short side fully covered
    x0 = xs[:, 0, 0]
    assert torch.equal(xs, (x0.view(6, 1, 1) + torch.arange(64)).expand(6, 64, 64))  # no fill, no resampling
    assert 0 <= x0.min() and x0.max() <= 96 - 64 and len(set(x0.tolist())) > 1
    # the student's window sits one patch in from every side of the teacher's crop
    assert torch.equal(xs[:, 16:48, 16], x0.view(6, 1).expand(6, 32) + 16)


def test_same_seed_same_batches(tmp_path):
    for i in range(5):
        noise(tmp_path / f"{i}.png", seed=i)

    def run(seed: int) -> list[dict]:
        dm = RetrofitDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0, patch_size=16,
                                crop_pct=0.5, seed=seed)
        return batches(dm, epochs=2)

    a, b, c = run(3), run(3), run(4)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
    assert [x["key"] for x in a[:3]] != [x["key"] for x in a[3:]]  # reshuffled in epoch 2


def corrupt_folder(root: Path) -> None:
    for i in range(4):
        solid(root / f"good{i}.png", (100,) * 3)
    (root / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    full = solid(root / "full.png", (7,) * 3, size=(64, 64)).read_bytes()
    (root / "full.png").unlink()
    (root / "sub").mkdir()
    (root / "sub" / "trunc.png").write_bytes(full[: len(full) // 2])


def test_unreadable_images_are_replaced_and_counted_across_workers(tmp_path, caplog):
    corrupt_folder(tmp_path)
    dm = RetrofitDataModule(str(tmp_path), img_size=16, batch_size=3, num_workers=2, patch_size=16,
                            mean=MEAN, std=STD)
    out = batches(dm, epochs=2)
    assert [len(b["key"]) for b in out] == [3, 3, 3, 3]  # replacements keep every batch full
    assert all(k.startswith("good") for b in out for k in b["key"])
    assert torch.allclose(unnormalise(torch.cat([b["image"] for b in out])), torch.tensor(100.0), atol=1e-3)
    assert dm.num_skipped == 2 and set(dm.skipped) == {"bad.jpg", "sub/trunc.png"}  # once, not per epoch
    with caplog.at_level(logging.WARNING, logger="retrofit.data"):
        line = dm.report()
    assert "skipped 2 unusable image(s): 1 corrupt or truncated, 1 not an image" in line
    assert "sub/trunc.png" in line and line in caplog.text


def test_hf_saved_dataset(tmp_path):
    levels = [20, 120, 220]
    data = datasets.Dataset.from_dict({
        "img": [Image.new("RGB", (40, 32), (v,) * 3) for v in levels], "id": ["x", "y", "z"],
    }).cast_column("img", datasets.Image())
    data.save_to_disk(str(tmp_path / "flowers"))
    common = dict(img_size=16, batch_size=3, num_workers=0, patch_size=16, mean=MEAN, std=STD, shuffle=False)
    (batch,) = batches(RetrofitDataModule(str(tmp_path / "flowers"), image_column="img", **common))
    assert batch["key"] == ["flowers:train:0", "flowers:train:1", "flowers:train:2"]
    assert unnormalise(batch["image"]).mean((1, 2, 3)).tolist() == pytest.approx(levels, abs=1e-3)
    streamed = RetrofitDataModule(str(tmp_path / "flowers"), image_column="img", key_column="id", streaming=True,
                                  **common)
    (batch,) = batches(streamed)
    assert batch["key"] == ["x", "y", "z"]
    with pytest.raises(RetrofitError, match="has no column 'image' \\(its columns: img, id\\): set image_column to img "
                       "\\(CLI: --data.image_column\\)"):
        RetrofitDataModule(str(tmp_path / "flowers"), **common).setup()


def test_hf_imagefolder_map_and_stream_skip_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    corrupt_folder(tmp_path / "pics")
    common = dict(img_size=16, batch_size=2, num_workers=0, patch_size=16, shuffle=False)
    mapped = RetrofitDataModule(f"imagefolder:{tmp_path / 'pics'}", **common)
    keys = [k for b in batches(mapped) for k in b["key"]]
    assert len(keys) == 6 and set(keys) <= {f"pics:train:{i}" for i in range(6)} and mapped.num_skipped == 2
    streamed = RetrofitDataModule(f"imagefolder:{tmp_path / 'pics'}", streaming=True, **common)
    out = batches(streamed)
    assert sorted(Path(k).name for b in out for k in b["key"]) == [f"good{i}.png" for i in range(4)]
    assert streamed.num_skipped == 2  # dropped from the stream, counted


def test_from_tensor_passes_normalised_images_through():
    images = torch.randn(5, 3, 32, 32)
    dm = RetrofitDataModule.from_tensor(images, img_size=32, batch_size=5, num_workers=0, patch_size=16,
                                        random_crop=False, shuffle=False)
    (batch,) = batches(dm)
    assert torch.equal(batch["image"], images) and batch["key"] == [f"tensor:{i}" for i in range(5)]
    with pytest.raises(RetrofitError, match="float"):
        RetrofitDataModule.from_tensor(torch.zeros(2, 32, 32))


def test_bad_settings_are_one_line_errors(tmp_path):
    solid(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(RetrofitError, match="img_size 40 is not divisible by the patch size 16: use 32 or 48"):
        RetrofitDataModule(str(tmp_path), img_size=40).configure_for(tiny_vit())
    with pytest.raises(RetrofitError, match="not an existing folder"):
        RetrofitDataModule(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrofitError, match="no images in"):
        RetrofitDataModule(str(tmp_path / "empty")).setup()
    with pytest.raises(RetrofitError, match="unknown interpolation 'lanczos'"):
        RetrofitDataModule(str(tmp_path), interpolation="lanczos")
    with pytest.raises(RetrofitError, match="patch size unknown"):
        RetrofitDataModule(str(tmp_path)).train_dataloader()


class _Recorder(L.LightningModule):
    """Configures the data module in setup, as RetrofitModule does, and records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.shapes: list[tuple[int, ...]] = []

    def setup(self, stage: str) -> None:
        self.trainer.datamodule.configure_for(tiny_vit(), margin_patches=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.shapes.append(tuple(batch["image"].shape))
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_run_goes_on_past_bad_images(tmp_path, caplog):
    corrupt_folder(tmp_path)
    dm = RetrofitDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0)
    module = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="retrofit.data"):
        trainer.fit(module, datamodule=dm)
    assert module.shapes == [(2, 3, 48, 48)] * 6
    assert dm.num_skipped == 2 and "skipped 2 unusable image(s)" in caplog.text


def faulty_folder(root: Path, good: int = 950) -> dict[str, int]:
    """``good`` 24 px PNGs and 50 faulty files, 7 or 8 of each kind; returns how many of each kind."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"good{i:04d}.png")
    makers = {
        "corrupt or truncated": lambda p: p.with_suffix(".png").write_bytes((root / "good0000.png").read_bytes()[:60]),
        "empty file": lambda p: p.with_suffix(".jpg").write_bytes(b""),
        "not an image": lambda p: p.with_suffix(".jpg").write_text("these are notes, not pixels"),
        "smaller than a patch": lambda p: Image.new("RGB", (12, 40), (9, 9, 9)).save(p.with_suffix(".png")),
        "wrong suffix": lambda p: Image.new("RGB", (30, 30), (1, 2, 3)).save(p.with_suffix(".jpg"), format="PNG"),
        "CMYK": lambda p: Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(p.with_suffix(".jpg")),
        "16-bit": lambda p: Image.fromarray(np.full((30, 30), 32768, dtype=np.uint16)).save(p.with_suffix(".png")),
    }
    counts = {kind: 8 if kind == "corrupt or truncated" else 7 for kind in makers}
    for kind, make in makers.items():
        for i in range(counts[kind]):
            make(root / "bad" / f"{kind.replace(' ', '_')}{i}")
    return counts


def test_a_thousand_images_with_five_percent_faulty_never_stop_nor_misshape_a_batch(tmp_path):
    counts = faulty_folder(tmp_path / "pics")
    dm = RetrofitDataModule(str(tmp_path / "pics"), img_size=16, batch_size=50, num_workers=2, patch_size=16,
                            mean=MEAN, std=STD, crop_pct=0.5)
    out = batches(dm)
    assert len(out) == 20 and all(b["image"].shape == (50, 3, 16, 16) for b in out)  # full, right-sized batches
    assert all(torch.isfinite(b["image"]).all() for b in out)
    skipped = {k: n for k, n in counts.items() if k not in ("wrong suffix", "CMYK", "16-bit")}
    assert dm.num_skipped == 29 and Counter(dm.skipped.values()) == skipped
    assert Counter(dm.images.converted.values()) == {"wrong suffix": 7, "CMYK": 7, "16-bit": 7}
    assert not set(dm.skipped) & {k for b in out for k in b["key"]}
    line = dm.report()
    assert line == ("skipped 29 unusable image(s): 8 corrupt or truncated, 7 empty file, 7 not an image, "
                    "7 smaller than a patch (bad/corrupt_or_truncated0.png, bad/corrupt_or_truncated1.png, "
                    "bad/corrupt_or_truncated2.png, bad/corrupt_or_truncated3.png, bad/corrupt_or_truncated4.png, "
                    "...); read 21 unusual image(s) as 8-bit RGB: 7 16-bit, 7 CMYK, 7 wrong suffix. "
                    "Remove or replace the skipped ones.")


def test_sixteen_bit_and_cmyk_images_keep_their_levels(tmp_path):
    grey = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    grey.save(tmp_path / "grey16.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red.jpg")
    image, note = decode_rgb(tmp_path / "grey16.png")
    assert note == "16-bit" and np.asarray(image).min() == np.asarray(image).max() == 128  # not clipped to 255
    image, note = decode_rgb(tmp_path / "red.jpg")
    assert note == "CMYK" and np.abs(np.asarray(image).astype(int) - (255, 0, 0)).max() <= 2
