"""diagnose: per-layer numbers equal the metrics, files land in out_dir, before/after side by side."""

import json

import pytest
import timm
import torch
from rich.console import Console

from retrofit import RetrofitError, add_registers, patch_features
from retrofit.diagnose import REPORT_NAME, diagnose, render_table
from retrofit.metrics import OutlierFraction, PatchNormStats

from .helpers import PLANTED, perturb_, planted_vit


def test_report_json_and_pngs_for_planted_model_vs_clean(tmp_path):
    before = planted_vit()
    after = add_registers(perturb_(timm.create_model("test_vit", pretrained=False, img_size=64)), 4).eval()
    images = torch.randn(3, 3, 64, 64)
    report = diagnose(before, images, tmp_path, compare=after, layers=[1, -1], names=["a/cat.jpg", "b", "c"],
                      labels=("before", "after"))

    on_disk = json.loads((tmp_path / REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report))
    planted, clean = report["models"]
    assert [entry["layer"] for entry in planted["layers"]] == [1, 5]
    assert (planted["num_registers"], clean["num_registers"]) == (0, 4)

    # the numbers are the metrics' numbers over the same features
    grids = patch_features(before, images, layers=[1, 5])
    stats, outliers = PatchNormStats(layers=[1, 5]), OutlierFraction(layers=[1, 5])
    stats.update(grids)
    outliers.update(grids)
    last = planted["layers"][1]
    assert last["max"] == pytest.approx(stats.compute()["layer5/max"].item(), rel=1e-5)
    assert last["p99"] == pytest.approx(stats.compute()["layer5/p99"].item(), rel=1e-5)
    assert last["high"] == pytest.approx(outliers.compute()["layer5/high"].item()) == pytest.approx(1 / 16)
    assert clean["layers"][1]["high"] == 0
    assert [image["high"] for image in planted["images"]] == [1 / 16] * 3

    figures = report["figures"]
    assert [f["png"] for f in figures] == ["000_a_cat.png", "001_b.png", "002_c.png"]
    for figure in figures:
        assert (tmp_path / figure["png"]).stat().st_size > 10_000
        assert (tmp_path / figure["heads_png"]).is_file()
        norm = torch.tensor(figure["maps"]["before"]["norm"])
        assert divmod(norm.argmax().item(), 4) == PLANTED
        assert torch.tensor(figure["maps"]["after"]["cls_attention_heads"]).shape == (2, 4, 4)
        assert torch.tensor(figure["maps"]["before"]["pca_rgb"]).shape == (4, 4, 3)
    assert not list(tmp_path.glob(".*tmp"))

    text = _render(report)
    assert "before" in text and "after" in text and "6.25%" in text  # 1 of 16 tokens


def _render(report: dict) -> str:
    console = Console(record=True, width=200)
    console.print(render_table(report))
    return " ".join(console.export_text().split())  # captions wrap


def test_eva_and_model_without_class_token(tmp_path):
    eva = add_registers(perturb_(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56,
                                                   depth=2)), 1).eval()
    no_cls = perturb_(timm.create_model("test_vit", pretrained=False, img_size=56, class_token=False,
                                        global_pool="avg", patch_size=14)).eval()
    images = torch.randn(2, 3, 56, 56)
    report = diagnose(eva, images, tmp_path, compare=no_cls, labels=("eva", "no-cls"))
    eva_summary, no_cls_summary = report["models"]
    assert len(eva_summary["layers"]) == 2 and len(no_cls_summary["layers"]) == 6
    assert "no class token" in no_cls_summary["cls_attention"]
    assert report["figures"][0]["maps"]["no-cls"]["cls_attention"] is None
    assert torch.tensor(report["figures"][0]["maps"]["eva"]["cls_attention"]).shape == (4, 4)
    assert (tmp_path / "000_image0.png").is_file() and (tmp_path / "000_image0_heads.png").is_file()
    assert "no class token" in _render(report)

    alone = diagnose(no_cls, images[:1], tmp_path / "alone")
    assert alone["figures"][0]["heads_png"] is None and alone["models"][0]["position_leakage"] is None
    assert not (tmp_path / "alone" / "000_image0_heads.png").exists()


def test_without_out_dir_writes_nothing_and_bad_input_is_one_line(tmp_path):
    model = planted_vit(img_size=48)
    report = diagnose(model, torch.randn(2, 3, 48, 48))
    assert "figures" not in report and len(report["models"][0]["layers"]) == 6
    with pytest.raises(RetrofitError, match="one name per image"):
        diagnose(model, torch.randn(2, 3, 32, 32), names=["x"])
    with pytest.raises(RetrofitError, match=r"\(N, 3, H, W\)"):
        diagnose(model, torch.randn(3, 32, 32))


def test_layers_in_any_order_get_their_own_numbers():
    model = perturb_(timm.create_model("test_vit", pretrained=False, img_size=32)).eval()
    images = torch.randn(2, 3, 32, 32)
    ordered = diagnose(model, images, layers=[0, 5], norm=False)["models"][0]["layers"]
    shuffled = diagnose(model, images, layers=[5, 0, -6], norm=False)["models"][0]["layers"]
    assert shuffled == ordered and [e["layer"] for e in ordered] == [0, 5]
    with torch.no_grad():
        first = patch_features(model, images, layers=[0], norm=False)[0]
    assert ordered[0]["max"] == pytest.approx(first.norm(dim=-1).max().item(), rel=1e-5)
