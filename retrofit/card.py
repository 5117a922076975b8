"""The model card (README.md) of an export, in timm's own layout, so the Hub shows it like any timm model.

The card is built from the model and the ``"retrofit"`` record of its config.json only; it is written into
the export folder, which :func:`retrofit.hub.push_to_hub` uploads as it is. timm's ``generate_readme``
writes it: front matter (``library_name: timm``, tags, the source's license when it is known), Model
Details, Model Usage, Model Comparison (the before/after of ``retrofit diagnose --compare``, when one was
measured) and Citation. The source is named as it was recorded (:func:`retrofit.backbones.weights_source`):
hub weights by name and tag, local weights by file name and sha256, anything else as not recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from timm.models._hub import generate_readme  # what push_to_hf_hub writes: the card of a timm model
from torch import nn

from .errors import RetrofitError
from .report import percent, read_report

CARD_NAME = "README.md"
NO_LICENSE = "<not known>"  # taken out of the front matter again: a license is given only when it is known
TASK = "image-feature-extraction"
TAGS = [TASK, "timm", "vision-transformer", "registers", "retrofit"]
PAPERS = {
    "Vision Transformers Need Registers": "https://arxiv.org/abs/2309.16588",
    "Vision Transformers with Self-Distilled Registers": "https://arxiv.org/abs/2505.21501",
}
CITATIONS = [
    """@inproceedings{darcet2024vision,
  title={Vision Transformers Need Registers},
  author={Darcet, Timoth{\\'e}e and Oquab, Maxime and Mairal, Julien and Bojanowski, Piotr},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2024}
}""",
    """@inproceedings{chen2025vision,
  title={Vision Transformers with Self-Distilled Registers},
  author={Chen, Yinjie and Yan, Zipeng and Zhou, Chong and Dai, Bo and Luo, Andrew F.},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2025}
}""",
]


# ---- before/after of a diagnose report ------------------------------------------------------------


def _last_layer(summary: Mapping[str, Any]) -> dict[str, Any]:
    layer = summary["layers"][-1]
    return {"label": summary["label"], "layer": layer["layer"],
            **{k: layer[k] for k in ("median", "max", "high", "low")}}


def before_after(report: Mapping[str, Any] | str | Path, num_registers: int) -> dict[str, Any]:
    """The card's comparison from a ``diagnose --compare`` report of this model and its original.

    The retrofitted model is the one with ``num_registers`` registers, whichever side of the
    comparison it was on; the other one must have a different count (the original's).
    """
    report = read_report(report)
    models = report.get("models", [])
    ours = [m for m in models if m.get("num_registers") == num_registers]
    if len(models) != 2 or len(ours) != 1:
        counts = [m.get("num_registers") for m in models]
        raise RetrofitError(
            f"the diagnose report compares models with {counts} registers, not this {num_registers}-register "
            "model and its original: run `retrofit diagnose MODEL --compare ORIGINAL --out DIR` and pass DIR."
        )
    original = next(m for m in models if m is not ours[0])
    return {
        "images": len(report["images"]),
        "input_size": report["settings"].get("input_size"),
        "k": report["settings"]["k"],
        "threshold": report["settings"].get("threshold"),
        "original": _last_layer(original),
        "retrofitted": _last_layer(ours[0]),
        "cosine": report.get("cosine"),
    }


def _comparison_text(c: Mapping[str, Any]) -> str:
    before, after = c["original"], c["retrofitted"]
    cut = f"norm > {c['threshold']:g}" if c.get("threshold") else f"> {c['k']:g}x the image's median norm"
    rows = [
        (f"high-norm outlier tokens ({cut})", percent(before["high"]), percent(after["high"])),
        (f"low-norm outlier tokens (< 1/{c['k']:g}x the median)", percent(before["low"]), percent(after["low"])),
        ("max patch-token norm", f"{before['max']:.4g}", f"{after['max']:.4g}"),
        ("median patch-token norm", f"{before['median']:.4g}", f"{after['median']:.4g}"),
        ("max / median norm", f"{before['max'] / before['median']:.3g}", f"{after['max'] / after['median']:.3g}"),
    ]
    if c.get("cosine"):
        rows.append(("patch cosine to the original (mean / 5th percentile)", "1",
                     f"{c['cosine']['mean']:.3f} / {c['cosine']['p5']:.3f}"))
    size = c.get("input_size")
    where = f" at {size[0]}x{size[1]} px" if size else ""
    lines = [
        f"Measured by `retrofit diagnose --compare` on {c['images']} images{where}, patch tokens of the last "
        f"block (layer {after['layer']}):",
        "",
        f"| | original (`{before['label']}`) | retrofitted (`{after['label']}`) |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {b} | {a} |" for name, b, a in rows),
    ]
    return "\n".join(lines)


# ---- the card -------------------------------------------------------------------------------------


def _source(source: Mapping[str, str], architecture: str) -> str:
    """The source model as recorded: hub weights by name and tag (linked), a local file by name and sha256 (never
    the user's path), a bare architecture as random weights; anything else is not recorded."""
    name = f"`{source.get('model', architecture)}`"
    if source.get("hub_id"):
        return f"[{name}](https://huggingface.co/{source['hub_id']})"
    if source.get("file"):
        return f"{name}, weights from the local file `{source['file']}` (sha256 `{source['sha256']}`)"
    if source.get("weights") == "random":
        return f"{name}, randomly initialised (no pretrained weights)"
    if source.get("url"):
        return f"{name}, weights from {source['url']}"
    return f"`{architecture}` (not recorded: an in-memory model)"


def _training(info: Mapping[str, Any]) -> dict[str, str]:
    details = {}
    if info.get("freeze"):
        details["Freeze preset"] = f"`{info['freeze']}`"
    if info.get("step") is not None:
        details["Steps"] = f"{info['step']:,}"
    batch, distinct = info.get("batch_size"), info.get("train_images")
    if batch or distinct:
        seen = f"{info.get('step', 0) * batch:,} seen ({batch} per step)" if batch else ""
        details["Images"] = ", ".join(p for p in (seen, f"{distinct:,} distinct" if distinct else "") if p)
    if info.get("img_size"):
        details["Resolution"] = f"{info['img_size']} x {info['img_size']} px (the training size)"
    return details


def _usage(name: str) -> str:
    return f"""```python
import timm
import torch
from PIL import Image

model = timm.create_model("{name}", pretrained=True).eval()  # the registers come with it
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))

image = Image.open("photo.jpg").convert("RGB")
with torch.no_grad():
    tokens = model.forward_features(transform(image).unsqueeze(0))
patch_tokens = tokens[:, model.num_prefix_tokens:]  # class and register tokens dropped
```

Only timm is needed: the registers are timm's own `reg_tokens` (with `no_embed_class=True`), recorded in
config.json's `model_args`."""


def model_card(model: nn.Module, info: Mapping[str, Any], repo_id: str | None = None,
               folder_name: str = "this folder") -> dict[str, Any]:
    """timm's ``model_card`` dict for an export (what timm's ``generate_readme`` takes)."""
    num_registers = info.get("num_registers", getattr(model, "num_reg_tokens", 0))
    height, width = model.patch_embed.img_size  # what it was built for: the training size when it was exported
    size = f"{height} x {width}" + (" (other sizes too: dynamic_img_size)" if model.dynamic_img_size else "")
    source = _source(info.get("source") or {}, model.pretrained_cfg["architecture"])
    card: dict[str, Any] = {
        "tags": TAGS,
        "license": (info.get("source") or {}).get("license") or NO_LICENSE,
        "description": (
            f"{source} with {num_registers} register tokens added after pre-training: the frozen original "
            "taught the same model plus registers to reproduce its patch features with the high-norm artifact "
            f"tokens taken out (post-hoc registers by self-distillation, PH-Reg style), with `retrofit` "
            f"{info.get('version', '')}."
        ),
        "details": {
            "Model Type": "Image feature backbone",
            "Source model": source,
            "Registers": str(num_registers),
            **_training(info),
            "Model Stats": {
                "Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}",
                "Image size": size,
            },
            "Papers": [f"{title}: {url}" for title, url in PAPERS.items()],
        },
        "usage": _usage(f"hf-hub:{repo_id}" if repo_id else f"local-dir:path/to/{folder_name}"),
        "citation": CITATIONS,
    }
    if info.get("diagnose"):
        card["comparison"] = _comparison_text(info["diagnose"])
    return card


def card_text(model: nn.Module, info: Mapping[str, Any], name: str, repo_id: str | None = None) -> str:
    """README.md of an export named ``name`` (the folder's, or the Hub repo's last part)."""
    card = model_card(model, info, repo_id, folder_name=name)
    text = generate_readme(card, repo_id.split("/")[-1] if repo_id else name, task_name=TASK)
    return text.replace(f"license: {NO_LICENSE}\n", "", 1)  # timm would write apache-2.0 for a missing license


def write_card(model: nn.Module, folder: str | Path, info: Mapping[str, Any], name: str,
               repo_id: str | None = None) -> Path:
    """Write README.md into ``folder`` (the export's temporary folder: it is renamed into place with it)."""
    path = Path(folder) / CARD_NAME
    path.write_text(card_text(model, info, name, repo_id), encoding="utf-8")
    return path
