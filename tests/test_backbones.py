"""load_backbone: names, local checkpoints in foreign layouts, export dirs, and one-line errors."""

import hashlib
import pickle

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from retrofit import RetrofitError, add_registers, export, load_backbone
from retrofit.backbones import weights_source

from .helpers import perturb_

DINO_KW = dict(img_size=42, depth=2)


def _dinov2():
    return perturb_(timm.create_model("vit_small_patch14_dinov2", pretrained=False, **DINO_KW)).eval()


def _same_outputs(a, b):
    x = torch.randn(1, 3, *a.patch_embed.img_size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_checkpoint_in_every_format(tmp_path, suffix):
    ref = _dinov2()
    path = tmp_path / f"w{suffix}"
    sd = ref.state_dict()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    model = load_backbone("vit_small_patch14_dinov2", checkpoint=path, **DINO_KW)
    assert not model.training
    assert _same_outputs(ref, model)


def test_original_dinov2_layout_goes_through_timm_filter(tmp_path):
    ref = _dinov2()
    sd = dict(ref.state_dict(), mask_token=torch.zeros(1, ref.embed_dim))  # as in facebookresearch/dinov2
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    model = load_backbone("vit_small_patch14_dinov2", checkpoint=tmp_path / "dinov2_vits14_pretrain.pth",
                          **DINO_KW)
    assert _same_outputs(ref, model)


def test_openai_clip_layout_goes_through_timm_filter(tmp_path):
    kw = dict(img_size=32, depth=1, num_classes=512)
    ref = perturb_(timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, **kw)).eval()
    swaps = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
             ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), (".norm1", ".ln_1"), (".norm2", ".ln_2")]
    sd = {}
    for k, v in ref.state_dict().items():
        if k == "cls_token":
            k, v = "class_embedding", v[0, 0]
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k == "head.weight":
            k, v = "proj", v.t()
        elif k == "head.bias":
            continue  # OpenAI CLIP's projection has no bias; timm fills zeros
        elif k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        for a, b in swaps:
            k = k.replace(a, b)
        sd["visual." + k] = v.contiguous()
    with torch.no_grad():
        ref.head.bias.zero_()
    save_file(sd, str(tmp_path / "clip.safetensors"))
    model = load_backbone("vit_base_patch16_clip_224.openai", checkpoint=tmp_path / "clip.safetensors", **kw)
    assert _same_outputs(ref, model)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/retrofit-pwned", "w"))


BAD_INPUTS = [
    ("unknown name", lambda p: load_backbone("vit_smal_patch14_dinov2"),
     "unknown model 'vit_smal_patch14_dinov2'.*Did you mean vit_small_patch14_dinov2"),
    ("missing file", lambda p: load_backbone("test_vit", checkpoint=p / "nope.safetensors"), "does not exist"),
    ("corrupt safetensors", lambda p: (p / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
     and load_backbone("test_vit", checkpoint=p / "bad.safetensors"), "does not load into test_vit.*not corrupt"),
    ("unknown suffix", lambda p: (p / "w.ckpt.gz").write_bytes(b"x")
     and load_backbone("test_vit", checkpoint=p / "w.ckpt.gz"), "unknown suffix"),
    ("weights of another architecture", lambda p: save_file(timm.create_model("test_vit").state_dict(),
     str(p / "tv.safetensors")) or load_backbone("vit_small_patch14_dinov2", checkpoint=p / "tv.safetensors",
                                                 **DINO_KW), "does not load into vit_small_patch14_dinov2 .*Missing"),
    ("not a ViT", lambda p: load_backbone("resnet18"),
     "ResNet is not a supported Vision Transformer: retrofit supports timm VisionTransformer, timm Eva"),
    ("checkpoint path given as name", lambda p: load_backbone(str(p / "weights.safetensors")),
     "is a file or folder, not a model name"),
    ("pickle that runs code", lambda p: (p / "evil.pth").write_bytes(pickle.dumps(_Exploit()))
     and load_backbone("test_vit", checkpoint=p / "evil.pth"), "weights_only=True blocked loading"),
    ("offline hub weights", lambda p: load_backbone("test_vit"),
     "could not fetch pretrained weights.*HF_HUB_OFFLINE is set.*--model.checkpoint PATH in retrofit fit"),
]


@pytest.mark.parametrize(("what", "call", "pattern"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, what, call, pattern):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no waiting on the network
    with pytest.raises(RetrofitError, match=pattern) as err:
        call(tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "retrofit-pwned").exists()


def test_the_source_of_the_weights_is_recorded_as_it_was(tmp_path, monkeypatch):
    """Hub weights by name, tag and license; a bare architecture as random; an export by file and hash, keeping the
    license its own card knew; a model load_backbone did not build: nothing."""
    create_model = timm.create_model

    def offline_hub(name, pretrained=False, **kwargs):  # the architecture as if its hub weights had been fetched
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_hub)
    hub = load_backbone("test_vit")  # no tag: timm's default one is what was fetched
    assert weights_source(hub) == {"model": "test_vit.r160_in1k", "hub_id": "timm/test_vit.r160_in1k",
                                   "license": "apache-2.0"}
    monkeypatch.setattr(timm, "create_model", create_model)
    assert weights_source(load_backbone("test_vit", pretrained=False)) == {"model": "test_vit", "weights": "random"}
    assert weights_source(timm.create_model("test_vit")) == {}  # in memory: not recorded

    exported = export(add_registers(hub, 2), tmp_path / "reg2", source=weights_source(hub))
    again = weights_source(load_backbone(exported))
    assert again == {"model": "test_vit", "file": "reg2/model.safetensors", "license": "apache-2.0",
                     "sha256": hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()}
