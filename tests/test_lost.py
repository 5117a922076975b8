"""LOST boxes and CorLoc: known answers on hand-made keys and boxes, and discovery on synthetic scenes."""

import json

import numpy as np
import pytest
import timm
import torch

from retrofit import RetrofitError, add_registers
from retrofit.evaluate import best_iou, corloc, evaluate_lost, lost_box
from retrofit.evaluate.datasets import batches, box_dataset
from retrofit.evaluate.lost import _patch_keys, lost_box_from_keys

from .helpers import perturb_, write_scenes

pytestmark = pytest.mark.usefixtures("one_thread")


def centred_colour_vit(size: int = 96, patch: int = 8) -> torch.nn.Module:
    """A 3-block ``test_vit`` whose last-block keys are each patch's pixels described relative to the image.

    LOST needs what trained ViTs provide: background patches alike, object patches unlike them.
    A random-init test_vit gives that only for colour pairs its random weights happen to map to
    anti-correlated keys (measured: CorLoc 0.37-0.5 on random-colour squares over 4 seeds; this
    model 0.97-1.0).
    The weights below build that from generic operations, knowing nothing about objects: a random
    patch embedding (colour and texture projection, scaled so LayerNorm's eps is negligible); block 0
    replaces each token by its LayerNorm (the MLP computes GELU(z) - GELU(-z) = z); block 1
    subtracts the image's mean token (q = 0 gives uniform attention, value = LN(x), proj = -I);
    block 2 reads keys = LN(x). Keys are then centred per image, so a minority region (the object)
    correlates negatively with the majority (the background).
    """
    model = timm.create_model("test_vit", pretrained=False, img_size=size, patch_size=patch, depth=3).eval()
    d, eye = model.embed_dim, torch.eye(model.embed_dim)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.zero_()
        model.patch_embed.proj.weight.mul_(0.05)
        model.patch_embed.proj.bias.zero_()
        for block in model.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
        fc1, fc2 = model.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc2.weight
        fc1[:d], fc1[d:2 * d], fc2[:, :d], fc2[:, d:2 * d] = eye, -eye, eye, -eye
        model.blocks[1].attn.qkv.weight[2 * d:] = eye
        model.blocks[1].attn.proj.weight.copy_(-eye)
        model.blocks[2].attn.qkv.weight[d:2 * d] = eye
    return model


def test_corloc_known_answer():
    gt = [
        torch.tensor([[0.0, 0, 10, 10]]),
        torch.tensor([[0.0, 0, 10, 20]]),
        torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10]]),
        torch.tensor([[0.0, 0, 10, 10]]),
    ]
    boxes = [(0.0, 0, 10, 10), (0.0, 0, 10, 10), (1.0, 1, 10, 10), (5.0, 0, 15, 10)]
    assert [best_iou(b, g) for b, g in zip(boxes, gt, strict=True)] == pytest.approx([1.0, 0.5, 0.81, 50 / 150])
    assert corloc(boxes, gt) == 0.75  # IoU exactly 0.5 counts; any ground-truth box may match
    assert best_iou((0.0, 0, 1, 1), torch.zeros(0, 4)) == 0.0
    with pytest.raises(RetrofitError, match="one predicted box per image"):
        corloc(boxes[:3], gt)


def test_lost_on_hand_made_keys():
    # 6x8 grid: a 2x3 object (rows 1-2, cols 4-6) with keys +v, background -v, plus noise; a far
    # background patch with a key of its own must not join the object's component.
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, generator=g)
    keys = -v.repeat(6, 8, 1) + 0.1 * torch.randn(6, 8, 16, generator=g)
    keys[1:3, 4:7] = v + 0.1 * torch.randn(2, 3, 16, generator=g)
    keys[5, 0] = torch.randn(16, generator=g)
    assert lost_box_from_keys(keys, (16, 16), k=10) == (64.0, 16.0, 112.0, 48.0)


def test_keys_are_last_block_keys():
    # Read against the block's own weights: qk_norm, registers and 2 heads must all line up.
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=32, depth=2, qk_norm=True))
    model = add_registers(model, 2).eval()
    x = torch.randn(2, 3, 48, 32)
    inputs = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    keys = _patch_keys(model, x)
    handle.remove()
    attn = model.blocks[-1].attn
    k = attn.qkv(model.blocks[-1].norm1(inputs[0]))[..., 64:128].unflatten(-1, (2, 32))
    expected = attn.k_norm(k)[:, model.num_prefix_tokens:].flatten(2).reshape(2, 3, 2, 64)
    assert keys.shape == (2, 3, 2, 64)
    assert torch.allclose(keys, expected, atol=1e-6)


def test_lost_finds_squares(tmp_path):
    model = centred_colour_vit()
    root = write_scenes(tmp_path, 13, seed=0, size=96)
    truth = json.loads((root / "images" / "boxes.json").read_text())
    truth["12.png"] = []  # an image without a box cannot be scored: skipped, not counted as a miss
    (root / "images" / "boxes.json").write_text(json.dumps(truth))
    result = evaluate_lost(model, root / "images", img_size=96, batch_size=6, progress=True)
    assert result["n"] == 12 and result["skipped"] == 1
    assert result["corloc"] >= 0.8
    assert np.median([p["iou"] for p in result["per_image"]]) > 0.55
    first = result["per_image"][0]
    gt = torch.tensor(truth[first["key"]], dtype=torch.float)
    assert first["iou"] == pytest.approx(best_iou(tuple(first["box"]), gt))
    _, images, _ = next(batches(box_dataset(root / "images"), model, 96, batch_size=1))
    assert lost_box(model, images[0]) == tuple(first["box"])  # the one-image API gives the same box
    with pytest.raises(RetrofitError, match=r"one \(3, H, W\) image tensor"):
        lost_box(model, images)
