"""The diagnose page: one self-contained file that a real (headless) browser renders with all its figures."""

import base64
import html
import json
import re
import shutil
import subprocess

import pytest
import timm
import torch

from retrofit import add_registers
from retrofit.diagnose import diagnose

from .helpers import perturb_, planted_vit

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
# appended to a copy of the page: after load, the size each <img> decoded to lands in the dumped DOM
PROBE = ("<script>addEventListener('load', () => { document.body.dataset.images = JSON.stringify("
         "[...document.images].map(i => [i.naturalWidth, i.naturalHeight])); });</script>")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    torch.manual_seed(0)
    after = add_registers(perturb_(timm.create_model("test_vit", pretrained=False, img_size=64)), 4).eval()
    out = tmp_path_factory.mktemp("page")
    diagnose(planted_vit(), torch.randn(1, 3, 64, 64), out, compare=after, names=["a/<b>&.png"],
             labels=("before", "after"))
    return out / "index.html"


def test_page_is_self_contained_with_the_report_numbers(page):
    text = page.read_text()
    report = json.loads((page.parent / "diagnose.json").read_text())
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)  # no file, no URL
    assert "<script" not in text
    for name in ("residual.png", *(n for f in report["figures"] for n in (f["png"], f["heads_png"]))):
        assert base64.b64encode((page.parent / name).read_bytes()).decode() in text  # each PNG, byte for byte
    residual = report["models"][0]["residual"]  # the per-block table of the residual stream
    assert "Residual stream per block" in text and f"<td>{residual['max_ratio'][-1]:.1f}</td>" in text
    assert "&lt;b&gt;&amp;.png" in text and "<b>&.png" not in text  # names are escaped
    before = report["models"][0]["layers"][-1]
    assert f"<td>{before['max']:.3g}</td>" in text and f'<td class="bad">{100 * before["high"]:.2f}%</td>' in text
    assert f"mean {report['cosine']['mean']:.3f}" in text and "1 image at 64x64 px" in text


@pytest.mark.skipif(BROWSER is None, reason="no headless browser: install Chromium (apt-get install chromium)")
def test_page_renders_its_images_in_a_headless_browser(page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    run = subprocess.run([BROWSER, *HEADLESS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    if "<body" not in run.stdout:
        pytest.skip(f"{BROWSER} did not start here: {run.stderr.strip().splitlines()[-1:]}")
    sizes = json.loads(html.unescape(re.search(r'data-images="([^"]*)"', run.stdout)[1]))
    assert len(sizes) == 3 and all(w > 100 and h > 100 for w, h in sizes)  # every figure decoded and laid out
