"""export/load: timm-native, bit-identical through retrofit and through plain timm, atomic."""

import copy
import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file

from retrofit import RetrofitError, add_registers, export, load, load_backbone
from retrofit.files import write_json

from .helpers import file_size_limit, perturb_


@pytest.fixture
def student():
    model = perturb_(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=42, depth=2))
    return add_registers(model, 4).eval()


def test_round_trip_is_bit_identical(tmp_path, student):
    out = export(student, tmp_path / "exp")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2"
    assert config["model_args"]["reg_tokens"] == 4 and config["model_args"]["no_embed_class"] is True
    assert config["model_args"]["img_size"] == [42, 42]
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["pretrained_cfg"]["interpolation"] == "bicubic"
    assert config["retrofit"]["num_registers"] == 4
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected = student.forward_features(x)
        assert torch.equal(load(out).forward_features(x), expected)
        assert torch.equal(load_backbone(out).forward_features(x), expected)


PLAIN_TIMM = textwrap.dedent("""
    import sys, timm, torch
    from safetensors.torch import load_file, save_file
    out_dir, arch, x_path, result_path = sys.argv[1:5]
    x = load_file(x_path)["x"]
    a = timm.create_model("local-dir:" + out_dir, pretrained=True).eval()
    b = timm.create_model(arch, reg_tokens=4, no_embed_class=True, pretrained=True,
                          pretrained_cfg_overlay=dict(file=out_dir + "/model.safetensors")).eval()
    with torch.no_grad():
        save_file({"a": a.forward_features(x), "b": b.forward_features(x)}, result_path)
    assert not any(m.startswith("retrofit") for m in sys.modules), "retrofit was imported"
""")


def test_plain_timm_loads_the_export_without_retrofit(tmp_path):
    # Default-size model, so create_model(arch, reg_tokens=N, no_embed_class=True) rebuilds the same shapes
    # (docs/method.md, "timm facts").
    student = add_registers(perturb_(timm.create_model("test_vit", pretrained=False)), 4).eval()
    out = export(student, tmp_path / "exp")
    x = torch.randn(2, 3, 160, 160)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TIMM)
    result = tmp_path / "result.safetensors"
    subprocess.run([sys.executable, str(script), str(out), "test_vit", str(tmp_path / "x.safetensors"),
                    str(result)], check=True, cwd=tmp_path)
    from safetensors.torch import load_file

    got = load_file(str(result))
    with torch.no_grad():
        expected = student.forward_features(x)
    assert torch.equal(got["a"], expected)
    assert torch.equal(got["b"], expected)


def test_existing_directory_is_kept_unless_overwrite(tmp_path, student):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(RetrofitError, match="already exists and is not empty.*overwrite=True") as err:
        export(student, out)
    assert "\n" not in str(err.value)
    assert (out / "mine.txt").read_text() == "keep me"
    export(student, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary or backup left behind


def test_interrupted_export_leaves_nothing(tmp_path, student, monkeypatch):
    def crash(model, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("retrofit._export"), "save_for_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        export(student, tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_export_dir_is_one_line_error(tmp_path, student):
    out = export(student, tmp_path / "exp")
    (out / "model.safetensors").unlink()
    with pytest.raises(RetrofitError, match="no model.safetensors") as err:
        load(out)
    assert "\n" not in str(err.value)


@pytest.fixture
def tiny():
    """A 1.6 MB student: quicker to build than ``student``, far above a 100 kB file size limit."""
    return add_registers(perturb_(timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8)), 2)


def test_a_write_that_fails_half_way_keeps_the_previous_export(tmp_path, tiny):
    out = export(tiny, tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    retrained = perturb_(copy.deepcopy(tiny))
    with pytest.raises(RetrofitError) as err, file_size_limit(100_000):
        export(retrained, out, overwrite=True)
    assert "\n" not in str(err.value) and "could not write the export" in str(err.value)
    assert f"{out} is unchanged" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary folder left


def test_export_over_the_models_own_source_is_refused(tmp_path, tiny):
    source = export(tiny, tmp_path / "original")
    before = (source / "model.safetensors").read_bytes()
    loaded = load_backbone(source)
    with pytest.raises(RetrofitError, match="holds the original model this one was made from") as err:
        export(loaded, source, overwrite=True)
    assert "\n" not in str(err.value) and (source / "model.safetensors").read_bytes() == before
    with pytest.raises(RetrofitError, match="holds the original model"):
        export(tiny, tmp_path / "." / "original", overwrite=True, backbone=str(source))


def test_a_replace_cut_short_between_its_renames_is_undone(tmp_path, tiny):
    out = export(tiny, tmp_path / "exp")
    out.rename(tmp_path / ".exp.old")  # killed after moving the old export aside, before the new one landed
    with pytest.raises(RetrofitError, match="already exists"):
        export(tiny, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_written_files_and_folders_follow_the_umask(tmp_path, tiny, mask):
    previous = os.umask(mask)
    try:
        out = export(tiny, tmp_path / "exp")
        report = write_json({"a": 1}, tmp_path / "r" / "report.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for path in [*out.iterdir(), report]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
