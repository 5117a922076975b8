"""patch_features: (B, H, W, D) grids without prefix tokens, at any size the patch divides."""

import pytest
import timm
import torch

from retrofit import RetrofitError, add_registers, patch_features

from .helpers import perturb_


@pytest.mark.parametrize("name", ["test_vit", "eva02_tiny_patch14_224"])
def test_grid_matches_forward_features(name):
    model = perturb_(timm.create_model(name, pretrained=False, img_size=56 if "eva" in name else 64, depth=2))
    model = add_registers(model, 3).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    grid = patch_features(model, x)
    tokens = model.forward_features(x)
    gh, gw = model.patch_embed.grid_size
    assert grid.shape == (2, gh, gw, model.embed_dim)
    assert torch.equal(grid.reshape(2, gh * gw, -1), tokens[:, model.num_prefix_tokens:])


def test_intermediate_layers_and_other_sizes():
    model = timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64, depth=3)
    model = perturb_(model).eval()
    x = torch.randn(1, 3, 64, 64)
    last, = patch_features(model, x, layers=[2])
    assert torch.allclose(last, patch_features(model, x), atol=1e-6)
    grids = patch_features(model, x, layers=[0, 2], norm=False)
    assert [g.shape for g in grids] == [(1, 4, 4, 384)] * 2
    wide = patch_features(model, torch.randn(1, 3, 48, 96))
    assert wide.shape == (1, 3, 6, 384)
    # the fixed-size model is restored afterwards
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size
    with pytest.raises(AssertionError):
        model(torch.randn(1, 3, 48, 96))


def test_layer_out_of_range_is_one_line_error():
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    with pytest.raises(RetrofitError, match="layer 6 does not exist: test_vit has blocks 0..5"):
        patch_features(model, torch.randn(1, 3, 32, 32), layers=[2, 6])


def test_size_not_divisible_is_one_line_error():
    model = timm.create_model("test_vit", pretrained=False, img_size=64)
    with pytest.raises(RetrofitError, match="not divisible by the patch size 16x16.*48x48") as err:
        patch_features(model, torch.randn(1, 3, 50, 63))
    assert "\n" not in str(err.value)
