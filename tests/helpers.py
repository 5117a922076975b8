"""Helpers shared by the test files: tiny timm ViTs with non-trivial weights, and images made on the fly."""

import contextlib
import json
import logging
import resource
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from retrofit import export

SIZE = 64  # test_vit has 16 px patches: a 4 x 4 grid
OBJECT_RGB, BACKGROUND_RGB = np.array([0.8, 0.4, 0.2]), np.array([0.2, 0.4, 0.7])


def perturb_(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Move every weight off its init so token / position-embedding bugs cannot hide behind zeros."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


PLANTED = (1, 2)


def planted_vit(img_size: int = 64, **kwargs) -> torch.nn.Module:
    """test_vit with one high-norm token at grid position PLANTED.

    A large position-embedding entry on channel 0 survives the blocks through the residual, and a
    final-norm gain on channel 0 turns it into a token of ~5x the median norm.
    """
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=img_size, **kwargs))
    row, col = PLANTED
    offset = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        model.pos_embed[0, offset + row * model.patch_embed.grid_size[1] + col, 0] += 200.0
        model.norm.weight[0] = 6.0
    return model.eval()


def write_images(folder: Path, n: int, size: int = SIZE, seed: int = 0) -> Path:
    """``n`` PNGs of flat backgrounds with a textured square (where artifacts would and would not form)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        img[y:y + size // 3, x:x + size // 3] = rng.integers(0, 255, (size // 3, size // 3, 3))
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return folder


def tiny_model_dir(folder: Path) -> Path:
    """A test_vit with non-trivial weights, exported: a model spec that load_backbone reads offline."""
    return export(perturb_(timm.create_model("test_vit", pretrained=False, img_size=SIZE)), folder)


def uniform_vit_dir(folder: Path) -> Path:
    """An exported test_vit whose patch tokens are all the same vector, whatever the image: LOST's box is then the
    whole image and a linear probe predicts one class everywhere, so evaluations have exact answers."""
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=SIZE))
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()  # each patch token is the projection's bias ...
        model.pos_embed.zero_()  # ... at every position
    return export(model, folder)


def square_scene(
    rng: np.random.Generator,
    width: int = 64,
    height: int = 64,
    side: tuple[int, int] = (20, 40),
    palette: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Image.Image, list[float], np.ndarray]:
    """A noise-textured square on a flat background: image, its XYXY box, its 0/1 mask.

    ``palette`` (object, background) colours are jittered per image; None draws both at random.
    """
    obj, background = palette or rng.uniform(0, 1, (2, 3))
    img = np.ones((height, width, 3)) * (background + rng.uniform(-0.15, 0.15, 3))
    s = int(rng.integers(*side))
    x0, y0 = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
    img[y0:y0 + s, x0:x0 + s] = obj + rng.uniform(-0.15, 0.15, 3) + rng.normal(0, 0.1, (s, s, 3))
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y0 + s, x0:x0 + s] = 1
    return Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)), [x0, y0, x0 + s, y0 + s], mask


def write_scenes(
    root: Path, n: int, seed: int, size: int = 64, palette: tuple[np.ndarray, np.ndarray] | None = None
) -> Path:
    """``root/images/k.png`` + ``root/images/boxes.json`` + ``root/masks/k.png``: every folder layout at once."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    boxes = {}
    for k in range(n):
        image, box, mask = square_scene(rng, size, size, palette=palette)
        image.save(root / "images" / f"{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
        boxes[f"{k}.png"] = [box]
    (root / "images" / "boxes.json").write_text(json.dumps(boxes))
    return root


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG) as they would on a full disk; SIGXFSZ is ignored meanwhile."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def lightning_prints_to_stderr(monkeypatch) -> None:
    """Lightning's log handlers write to the current ``sys.stderr`` (capsys's), not the one they found at import.

    Which of these loggers has a handler depends on whether the root logger had one when Lightning was imported.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            monkeypatch.setattr(handler, "stream", sys.stderr)
