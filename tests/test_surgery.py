"""add_registers: the conversion is exact, the input is untouched, inits and options behave."""

import math

import pytest
import timm
import torch
from timm.models._input import get_model_args

from retrofit import RetrofitError, add_registers, count_registers
from retrofit.features import forward_tokens, patch_features
from retrofit.surgery import at_input_size, register_key_mask, register_slice

from .helpers import perturb_

# CPU-friendly variants of the families users retrofit: DINOv2 (layer scale), CLIP (pre-norm),
# DeiT-III (no_embed_class already), EVA02 (RoPE, SwiGLU), a class-token-free ViT, a dynamic-size ViT,
# and a model that already has registers.
ARCHITECTURES = [
    ("test_vit", {}),
    ("vit_small_patch14_dinov2", dict(img_size=42, depth=3)),
    ("vit_base_patch16_clip_224.openai", dict(img_size=48, depth=2)),  # 512-wide projection head
    ("deit3_small_patch16_224", dict(img_size=48, depth=3)),
    ("eva02_tiny_patch14_224", dict(img_size=42, depth=3)),
    ("test_vit", dict(class_token=False, global_pool="avg", img_size=48)),
    ("test_vit", dict(dynamic_img_size=True, img_size=48)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=42, depth=3)),
]


def _masked_outputs(model, new, x, n_new):
    """Original tokens, and the new model's tokens at the same positions with the new registers hidden."""
    ref = forward_tokens(model, x)
    stop = register_slice(new).stop
    hidden = slice(stop - n_new, stop)
    total = new.num_prefix_tokens + ref.shape[1] - model.num_prefix_tokens
    out = forward_tokens(new, x, attn_mask=register_key_mask(new, total, hidden))
    keep = torch.cat([torch.arange(hidden.start), torch.arange(hidden.stop, total)])
    return ref, out[:, keep]


@pytest.mark.parametrize(("name", "kwargs"), ARCHITECTURES, ids=lambda v: str(v))
def test_conversion_is_exact(name, kwargs):
    model = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    new = add_registers(model, 4).eval()
    assert type(new) is type(model)
    assert new.no_embed_class
    assert count_registers(new) == count_registers(model) + 4
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    ref, out = _masked_outputs(model, new, x, 4)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(("name", "kwargs"), ARCHITECTURES[:5], ids=lambda v: str(v))
def test_zero_registers_is_the_same_function(name, kwargs):
    model = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    new = add_registers(model, 0).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max().item() < 1e-5


def test_input_is_not_mutated_and_mode_dtype_kept():
    model = perturb_(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2))
    model = model.to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = add_registers(model, 2)
    assert model.no_embed_class is False and count_registers(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert new.training and new.reg_token.dtype == torch.bfloat16
    assert new.reg_token.device == model.cls_token.device


def test_register_inits():
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=32))
    dim = model.embed_dim
    randn = add_registers(model, 64, init="randn", seed=1).reg_token
    assert randn.std().item() == pytest.approx(1 / math.sqrt(dim), rel=0.1)
    assert torch.equal(add_registers(model, 3, init="randn", seed=1).reg_token, randn[:, :3])
    assert add_registers(model, 3, init="timm").reg_token.abs().max().item() < 1e-4
    assert torch.count_nonzero(add_registers(model, 3, init="zeros").reg_token) == 0
    folded_cls = model.cls_token + model.pos_embed[:, :1]
    assert torch.allclose(add_registers(model, 3, init="cls").reg_token, folded_cls.expand(1, 3, dim))
    mean_patch = model.patch_embed.proj.bias + model.pos_embed[0, 1:].mean(0)
    registers = add_registers(model, 2, init="mean_patch").reg_token[0]
    torch.testing.assert_close(registers, mean_patch.expand(2, dim), atol=1e-5, rtol=0)
    assert not torch.equal(registers[0], registers[1])  # apart, so that training can tell them apart


def test_existing_registers_add_or_error():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2)
    new = add_registers(model, 2, existing="add")
    assert count_registers(new) == 6
    assert torch.equal(new.reg_token[:, :4], model.reg_token.detach())
    with pytest.raises(RetrofitError, match="already has 4 registers"):
        add_registers(model, 2, existing="error")


def test_bad_arguments_are_one_line_errors():
    model = timm.create_model("test_vit", pretrained=False, class_token=False, global_pool="avg", img_size=32)
    for kwargs, pattern in [
        (dict(init="cls"), "needs a class token"),
        (dict(init="ones"), "unknown register init"),
        (dict(num_registers=-1), "must be >= 0"),
    ]:
        with pytest.raises(RetrofitError, match=pattern) as err:
            add_registers(model, **{"num_registers": 2, **kwargs})
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(("arch", "kwargs", "size"), [
    ("test_vit", {}, 96),  # 160 px model, trained at 96
    ("eva02_tiny_patch14_224", {"depth": 2, "img_size": 112}, 56),  # rope and position embedding both resampled
])
def test_at_input_size_computes_what_a_dynamic_size_forward_computed_there(arch, kwargs, size):
    model = add_registers(perturb_(timm.create_model(arch, pretrained=False, **kwargs)), 2).eval()
    native = model.patch_embed.img_size
    built = at_input_size(model, size)
    assert tuple(built.patch_embed.img_size) == (size, size) and built.dynamic_img_size
    assert get_model_args(built)["img_size"] == (size, size) and model.patch_embed.img_size == native  # kept
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # the model at its own size, resampling to this one on the fly at every forward
        on_the_fly = patch_features(at_input_size(model, native[0]), x)
        torch.testing.assert_close(patch_features(built, x), on_the_fly, rtol=0, atol=0)
    assert at_input_size(built, size) is built
