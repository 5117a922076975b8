"""Register neurons and test-time registers: the planted units are found, TTR removes the artifacts without
training, with no units it is exact, any batch size gives the same answer, and the model is left as it was."""

import copy
import json

import pytest
import timm
import torch

from retrofit import RetrofitError, patch_features
from retrofit.metrics import outlier_mask, patch_cosine
from retrofit.neurons import RegisterNeurons, find_register_neurons
from retrofit.neurons import test_time_registers as with_test_time_registers  # not a test
from retrofit.synthetic import plant_artifacts, synthetic_images

NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    clean = timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8).eval()
    return clean, plant_artifacts(clean), plant_artifacts(clean, silent=True)


@pytest.fixture(scope="module")
def found(planted):
    return find_register_neurons(planted[1], synthetic_images(32, 64, seed=3, **NORM), top_k=6)


def planted_units(model, twin) -> set[tuple[int, int]]:
    """(block, unit) whose output differs between the planted model and its twin: the artifact units."""
    return {(b, int(u)) for b, (x, y) in enumerate(zip(model.blocks, twin.blocks, strict=True))
            for u in (x.mlp.fc2.weight != y.mlp.fc2.weight).any(dim=0).nonzero().flatten()}


def test_the_planted_units_top_the_ranking(planted, found, tmp_path):
    _, model, twin = planted
    rows = found.rows()
    truth = planted_units(model, twin)
    assert found.onset == 2 and found.outlier_fraction > 0.01
    assert {(b, u) for b, u, _, _ in rows} == truth  # the planted units, and only they, fire >= 10x at artifacts
    assert all(sparsity >= 0.5 for _, _, _, sparsity in rows)
    every = find_register_neurons(model, synthetic_images(32, 64, seed=3, **NORM), top_k=6, min_lift=0).rows()
    assert {(b, u) for b, u, _, _ in every[: len(truth)]} == truth and every[0][2] > 10 * every[len(truth)][2]
    loaded = RegisterNeurons.load(found.save(tmp_path / "neurons.json"))
    assert loaded == found and json.loads((tmp_path / "neurons.json").read_text())["onset"] == 2


def test_ranking_does_not_depend_on_the_batch_size(planted, found):
    again = find_register_neurons(planted[1], synthetic_images(32, 64, seed=3, **NORM), top_k=6, batch_size=1)
    assert again.units == found.units
    for block in found.scores:
        torch.testing.assert_close(torch.tensor(again.scores[block]), torch.tensor(found.scores[block]))


def test_test_time_registers_remove_held_out_artifacts(planted, found):
    _, model, twin = planted
    held = synthetic_images(32, 64, seed=4, **NORM)
    with torch.no_grad():
        before, truth = patch_features(model, held), patch_features(twin, held)
        with with_test_time_registers(model, found) as ttr:
            after = patch_features(ttr, held)
            one_by_one = torch.cat([patch_features(ttr, held[i:i + 1]) for i in range(8)])
    artifacts = outlier_mask(before)
    assert artifacts.float().mean() > 0.01
    assert outlier_mask(after).float().mean() < 0.005
    assert patch_cosine(after, truth)[artifacts].mean() > 0.9 > patch_cosine(before, truth)[artifacts].mean()
    torch.testing.assert_close(one_by_one, after[:8])  # per image, whatever the batch


def test_with_no_units_the_model_is_unchanged_and_restored_after(planted):
    clean, model, _ = planted
    held = synthetic_images(4, 64, seed=5, **NORM)
    snapshot = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        # float noise only; the planted model's sharp gate and 8x final-norm weight amplify it to ~1e-4
        for m, tol in ((clean, 1e-5), (model, 1e-3)):
            expected = patch_features(m, held)
            with with_test_time_registers(m, RegisterNeurons(units={}), num_registers=2) as ttr:
                assert ttr.num_prefix_tokens == 3
                torch.testing.assert_close(patch_features(ttr, held), expected, rtol=tol, atol=tol)
            assert m.num_prefix_tokens == 1 and "_pos_embed" not in vars(m)
            torch.testing.assert_close(patch_features(m, held), expected, rtol=0, atol=0)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_eva_with_swiglu():
    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=42, depth=3).eval()
    images = torch.randn(6, 3, 42, 42) * 0.1
    images[:, :, :14, :14] = 30.0  # one glaring patch per image: a high-norm token to rank units by
    found = find_register_neurons(eva, images, top_k=3, max_block=1, sparse_below=10.0, min_lift=0.0)
    assert found.count == 3 and set(found.units) <= {0, 1}
    with torch.no_grad():
        expected = patch_features(eva, images)
        with with_test_time_registers(eva, RegisterNeurons(units={})):
            torch.testing.assert_close(patch_features(eva, images), expected, rtol=1e-4, atol=1e-4)
        with with_test_time_registers(eva, found):
            moved = patch_features(eva, images)
            single = patch_features(eva, images[:1])
    assert moved.shape == expected.shape and not torch.allclose(moved, expected)
    torch.testing.assert_close(single, moved[:1])


def test_bad_input_is_one_line(planted, tmp_path):
    model = planted[1]
    with pytest.raises(RetrofitError, match="name block 9"):
        with with_test_time_registers(model, RegisterNeurons(units={9: [0]})):
            pass
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RetrofitError, match="not a register-neuron file"):
        RegisterNeurons.load(tmp_path / "bad.json")
    with pytest.raises(RetrofitError, match="non-empty"):
        find_register_neurons(model, torch.zeros(0, 3, 64, 64))


def test_cli_finds_units_and_scores_the_training_free_model(planted, tmp_path, capsys):
    from PIL import Image

    from retrofit import export
    from retrofit.cli import main

    _, model, twin = planted
    export(model, tmp_path / "planted")
    export(twin, tmp_path / "twin")
    pixels = (synthetic_images(12, 64, seed=8, mean=(0,) * 3, std=(1,) * 3) * 255).round().byte()
    (tmp_path / "images").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "images" / f"{i}.png")
    found = tmp_path / "neurons.json"
    assert main(["neurons", str(tmp_path / "planted"), "--images", str(tmp_path / "images"), "--out", str(found)]) == 0
    shown = capsys.readouterr().out
    assert "block" in shown and "sparsity" in shown and "artifacts start at block 2" in shown
    assert {(b, u) for b, us in RegisterNeurons.load(found).units.items() for u in us} == planted_units(model, twin)
    out = tmp_path / "diagnose"
    assert main(["diagnose", str(tmp_path / "planted"), "--images", str(tmp_path / "images"), "--ttr", str(found),
                 "--reference", str(tmp_path / "twin"), "--out", str(out), "--max_images", "12"]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    before, after = (m["layers"][-1]["high"] for m in report["models"])
    assert before > 0.01 and after == 0
    repair = list(report["repair"].values())
    assert repair[1]["artifacts"] > 0.9 > repair[0]["artifacts"]
    assert "Patch cosine to the reference" in capsys.readouterr().out
