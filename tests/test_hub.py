"""Model card and Hub push: the card in every export, the push through timm with the Hub stubbed at HfApi."""

import importlib
import json
import re

import pytest
import timm
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load

from retrofit import RetrofitError, add_registers, export
from retrofit.diagnose import diagnose
from retrofit.hub import push_to_hub

from .helpers import perturb_

HUB_SOURCE = {"model": "test_vit.r160_in1k", "hub_id": "timm/test_vit.r160_in1k", "license": "apache-2.0"}
RUN = dict(backbone="test_vit.r160_in1k", source=HUB_SOURCE, freeze="phreg", step=100, batch_size=16, img_size=160,
           train_images=50)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    original = perturb_(timm.create_model("test_vit", pretrained=False)).eval()
    return original, add_registers(original, 4).eval()


@pytest.fixture(scope="module")
def report(models):
    original, student = models
    return diagnose(student, torch.randn(2, 3, 160, 160), compare=original, labels=("ours", "orig"))


def test_card_in_every_export_and_plain_timm_loads_the_folder(tmp_path, models, report):
    _, student = models
    out = export(student, tmp_path / "vit_reg4", diagnose_report=report, **RUN)
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: timm" in front and "license: apache-2.0" in front  # the hub weights' license
    assert "- registers" in front and "pipeline_tag: image-feature-extraction" in front
    for line in ("**Registers:** 4", "**Freeze preset:** `phreg`", "**Steps:** 100",
                 "**Images:** 1,600 seen (16 per step), 50 distinct",
                 "**Resolution:** 160 x 160 px (the training size)",
                 "- Image size: 160 x 160 (other sizes too: dynamic_img_size)",
                 "**Source model:** [`test_vit.r160_in1k`](https://huggingface.co/timm/test_vit.r160_in1k)",
                 'timm.create_model("local-dir:path/to/vit_reg4", pretrained=True)'):
        assert line in card
    assert "Vision Transformers Need Registers" in card and "year={2024}" in card
    assert "Vision Transformers with Self-Distilled Registers" in card and "year={2025}" in card

    # the before/after table holds the diagnose numbers of the last block, original first
    ours, orig = (m["layers"][-1] for m in report["models"])
    row = re.search(r"\| high-norm outlier tokens [^|]*\| ([\d.]+)% \| ([\d.]+)% \|", card)
    assert row and float(row[1]) == pytest.approx(100 * orig["high"], abs=0.005)
    assert float(row[2]) == pytest.approx(100 * ours["high"], abs=0.005)
    assert f"| max patch-token norm | {orig['max']:.4g} | {ours['max']:.4g} |" in card
    assert f"{report['cosine']['mean']:.3f} / {report['cosine']['p5']:.3f}" in card
    assert json.loads((out / "config.json").read_text())["retrofit"]["diagnose"]["original"]["label"] == "orig"

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), student.forward_features(x))


def test_a_report_of_other_models_is_refused(tmp_path, models, report):
    original, _ = models
    with pytest.raises(RetrofitError, match=r"compares models with \[4, 0\] registers, not this 2-register"):
        export(add_registers(original, 2), tmp_path / "two", diagnose_report=report)
    with pytest.raises(RetrofitError, match="cannot read the diagnose report"):
        export(add_registers(original, 2), tmp_path / "two", diagnose_report=tmp_path / "missing")
    assert not (tmp_path / "two").exists()


def test_push_uploads_the_folder_as_written(tmp_path, models, fake_hub, monkeypatch):
    """create_repo + upload_folder of the export: the bytes on the Hub are the bytes on disk, nothing re-saved."""
    _, student = models
    out = export(student, tmp_path / "vit_reg4", repo_id="user/vit-reg4", **RUN)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the push built a model"))
    url = push_to_hub(out, "user/vit-reg4")
    assert url == "https://huggingface.co/user/vit-reg4/commit/0123abc"
    assert fake_hub.created == ["user/vit-reg4"]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "user/vit-reg4" and upload["folder_path"] == out
    assert upload["files"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(upload["files"]) == {"README.md", "config.json", "model.safetensors"}
    pushed = json.loads(upload["files"]["config.json"])
    assert pushed["model_args"]["reg_tokens"] == 4 and pushed["model_args"]["no_embed_class"] is True
    assert 'timm.create_model("hf-hub:user/vit-reg4", pretrained=True)' in upload["files"]["README.md"].decode()
    weights = load(upload["files"]["model.safetensors"])
    assert all(torch.equal(weights[k], v) for k, v in student.state_dict().items())


def test_push_failures_are_one_line_and_keep_the_export(tmp_path, models, fake_hub, monkeypatch):
    _, student = models
    out = export(student, tmp_path / "vit_reg4", **RUN)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])  # the HTTP client the Hub uses
    response = http.Response(401, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    fake_hub.fail = hub_errors.HfHubHTTPError("401 Client Error: Unauthorized\nInvalid token", response=response)
    with pytest.raises(RetrofitError) as refused:
        push_to_hub(out, "user/vit-reg4")
    fake_hub.fail = hub_errors.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    with pytest.raises(RetrofitError) as offline:
        push_to_hub(out, "user/vit-reg4")
    fake_hub.fail = ConnectionError("[Errno -2] Name or service not known")
    with pytest.raises(RetrofitError) as unreachable:
        push_to_hub(out, "user/vit-reg4")
    for error, fix in ((refused, "hf auth login"), (offline, "unset HF_HUB_OFFLINE"), (unreachable, "the network")):
        message = str(error.value)
        assert "\n" not in message and fix in message and "the local export is kept" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not fake_hub.uploads

    with pytest.raises(RetrofitError, match="is not an export folder"):
        push_to_hub(tmp_path, "user/vit-reg4")
    with pytest.raises(RetrofitError, match="is not a Hub repo id"):
        push_to_hub(out, "user/bad name")
    with pytest.raises(RetrofitError, match="names no owner"):
        push_to_hub(out, "vit-reg4")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("retrofit.hub.get_token", lambda: None)  # no token file on this machine either
    with pytest.raises(RetrofitError, match="needs a Hugging Face token: run `hf auth login`"):
        push_to_hub(out, "user/vit-reg4")
