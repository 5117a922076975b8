"""Maps: attention from hooked q/k equals timm's own, norm maps find a planted artifact, PCA colours."""

import pytest
import timm
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from retrofit import RetrofitError, add_registers
from retrofit.attention import cls_attention, last_block_qk
from retrofit.maps import compute_maps, display_rgb, pca_rgb
from retrofit.plots import figure_array, plot_heads, plot_maps

from .helpers import PLANTED, perturb_, planted_vit


def timm_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The last block's softmax output inside timm's own (unfused) forward, read at its dropout."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    model.forward_features(images)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name, kwargs, rope", [
    ("test_vit", dict(img_size=32, qk_norm=True), False),  # qk-norm
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), True),  # Eva: rope, separate q/v bias
])
def test_qk_and_cls_attention_are_timms_own(name, kwargs, rope):
    model = add_registers(perturb_(timm.create_model(name, pretrained=False, **kwargs)), 2).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    q, k = last_block_qk(model, x)
    heads, npt = model.blocks[-1].attn.num_heads, model.num_prefix_tokens
    assert q.shape[:3] == k.shape[:3] == (2, heads, npt + model.patch_embed.num_patches)
    theirs = timm_attention(model, x)  # leaves the layer unfused
    model.blocks[-1].attn.fused_attn = True
    if not rope:  # keys are taken before a rotary embedding, so only without one do they give the attention
        ours = (q * model.blocks[-1].attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        assert torch.allclose(ours, theirs, atol=1e-6)
    cls = cls_attention(model, x)
    assert cls.shape == (2, heads, *model.patch_embed.grid_size)
    assert torch.allclose(cls.flatten(2), theirs[:, :, 0, npt:], atol=1e-6)
    # the class token gives part of its attention to itself and the registers, the rest to the patches
    assert torch.allclose(cls.flatten(2).sum(-1), 1 - theirs[:, :, 0, :npt].sum(-1), atol=1e-6)
    assert model.training is False and q.requires_grad is False
    assert model.blocks[-1].attn.fused_attn is True  # unfused for our forward only


def test_norm_map_peaks_at_planted_token():
    model = planted_vit()
    maps = compute_maps(model, torch.randn(3, 3, 64, 64))
    for m in maps:
        flat = m.norms.argmax().item()
        assert divmod(flat, m.norms.shape[1]) == PLANTED
        assert m.norms.max() > 3 * m.norms.median()
        assert m.cut == pytest.approx(3 * m.norms.flatten().median().item())
        assert m.outliers.nonzero().tolist() == [list(PLANTED)]
        assert m.attention.shape == (2, 4, 4) and m.pca.shape == (4, 4, 3)


def test_model_without_class_token_has_no_attention_map():
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=32, class_token=False,
                                       global_pool="avg")).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RetrofitError, match="no class token"):
        cls_attention(model, x)
    maps = compute_maps(model, x)
    assert maps[0].attention is None
    rows = [("no cls", display_rgb(x, model)[0], maps[0])]
    assert plot_heads(rows) is None
    image = figure_array(plot_maps(rows))
    assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 0


def test_pca_first_component_follows_the_main_direction():
    rows = torch.arange(6.0)[:, None].expand(6, 5)
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    features = rows[None, :, :, None] * 3 * direction + 0.01 * torch.randn(2, 6, 5, 32)
    rgb = pca_rgb(features)
    assert rgb.shape == (2, 6, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1
    red = rgb[..., 0].mean(dim=2)  # mean over columns: one value per row
    corr = torch.corrcoef(torch.stack([red[0], torch.arange(6.0)]))[0, 1].abs()
    assert corr > 0.99
    assert torch.allclose(pca_rgb(features[:1]), rgb[:1])  # per image: the batch does not change a picture


def test_heads_figure_is_titled_and_no_label_is_clipped():
    model = planted_vit()
    x = torch.randn(1, 3, 64, 64)
    maps = compute_maps(model, x)[0]
    labels = ("vit_base_patch14_dinov2.lvd142m (original)", "retrofitted (4 registers)")
    fig = plot_heads([(label, display_rgb(x, model)[0], maps) for label in labels])
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = {t.get_text(): t.get_window_extent(canvas.get_renderer()) for t in fig.findobj(Text) if t.get_text()}
    assert "CLS attention of each head" in fig.get_suptitle() and set(labels) <= set(texts)
    for text, box in texts.items():  # every label, title and head name lies inside the picture
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, text
