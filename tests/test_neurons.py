"""Register neurons and test-time registers: the planted units are found, TTR removes the artifacts without
training, with no units it is exact, any batch size gives the same answer, and the model is left as it was."""

import copy
import json

import pytest
import timm
import torch

from retrofit import RetrofitError, patch_features
from retrofit.metrics import patch_cosine
from retrofit.neurons import RegisterNeurons, find_register_neurons
from retrofit.neurons import test_time_registers as with_test_time_registers  # not a test
from retrofit.residual import artifact_tokens, residual_norms, residual_profile
from retrofit.synthetic import plant_artifacts, synthetic_images

NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


FORMS = {  # the artifact model's forms: one source; several blocks, each with several unit groups of its own
    "one block": dict(),
    "final norm raised": dict(final_norm=True, seed=1),
    "two blocks, two groups each": dict(blocks=[2, 3], groups=2, seed=2),
    "three blocks, three pairs each": dict(blocks=[1, 2, 3], groups=3, units=2, seed=3),
    "two blocks, 24 units each": dict(blocks=[3, 4], groups=4, units=6, seed=4),
}


@pytest.fixture(scope="module")
def clean():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8).eval()


@pytest.fixture(scope="module")
def planted(clean):
    return clean, plant_artifacts(clean), plant_artifacts(clean, silent=True)


@pytest.fixture(scope="module")
def found(planted):
    return find_register_neurons(planted[1], synthetic_images(32, 64, seed=3, **NORM))


def planted_units(model, twin) -> set[tuple[int, int]]:
    """(block, unit) whose output differs between the planted model and its twin: the artifact units."""
    return {(b, int(u)) for b, (x, y) in enumerate(zip(model.blocks, twin.blocks, strict=True))
            for u in (x.mlp.fc2.weight != y.mlp.fc2.weight).any(dim=0).nonzero().flatten()}


def stream_outliers(model, images) -> float:
    """The largest share of high-norm outliers any block's raw output makes."""
    return max(residual_profile(model, images)[0].outliers)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_its_blocks_and_exactly_its_units(clean, form):
    """Found on the 32 images the plant was calibrated on (as fit searches its training images): where the
    artifacts build (first to last planted block) and every planted unit and no other - not the units of later
    blocks that read the artifacts, not units that fire on the flat patches they sit on. Test-time registers on
    that set then remove the artifacts of held-out images."""
    settings = FORMS[form]
    model, twin = plant_artifacts(clean, **settings), plant_artifacts(clean, **settings, silent=True)
    truth = planted_units(model, twin)
    found = find_register_neurons(model, synthetic_images(32, 64, seed=settings.get("seed", 0), **NORM))
    assert found.blocks == sorted({b for b, _ in truth}) == settings.get("blocks", [2])
    assert {(b, u) for b, u, *_ in found.rows()} == truth
    assert all(lift >= 10 and aligned >= 0.3 and sparsity >= 0.5 for *_, lift, aligned, sparsity in found.rows())
    held = synthetic_images(32, 64, seed=4, **NORM)
    with torch.no_grad():
        before, reference = patch_features(model, held), patch_features(twin, held)
        with with_test_time_registers(model, found) as ttr:
            after, left = patch_features(ttr, held), stream_outliers(ttr, held)
    artifacts = artifact_tokens(model, held)
    assert artifacts.float().mean() > 0.005 and left < 0.005
    cosine = patch_cosine(after, reference)[artifacts].mean(), patch_cosine(before, reference)[artifacts].mean()
    assert cosine[0] > 0.85 > 0.3 > cosine[1]


def test_a_model_without_artifacts_has_none(clean, tmp_path):
    """A random init has high-norm tokens from the patch embedding on (bright, busy patches): they are not made by
    the network, so no block is said to make artifacts and no unit is kept; the file says so."""
    images = synthetic_images(32, 64, seed=3, **NORM)
    norms = residual_norms(clean, images)
    assert (norms[:, 0] > 3 * norms[:, 0].median(-1, keepdim=True).values).any()  # outliers in the embedded patches
    found = find_register_neurons(clean, images)
    assert found.blocks == [] and found.count == 0 and found.describe() == "no artifacts"
    assert max(found.profile.outliers) == 0 and len(found.images) == 32
    assert RegisterNeurons.load(found.save(tmp_path / "none.json")).profile.start is None


def test_the_record_round_trips(found, tmp_path):
    assert found.blocks == [2] and found.profile.peak == 2 and found.outlier_fraction > 0.01
    assert found.settings["max_units"] == 64 and found.images == [f"image{i}" for i in range(32)]
    loaded = RegisterNeurons.load(found.save(tmp_path / "neurons.json"))
    assert loaded == found and json.loads((tmp_path / "neurons.json").read_text())["profile"]["start"] == 2


def test_ranking_does_not_depend_on_the_batch_size(planted, found):
    again = find_register_neurons(planted[1], synthetic_images(32, 64, seed=3, **NORM), batch_size=5)
    assert again.units == found.units and again.profile == found.profile
    for block in found.scores:
        torch.testing.assert_close(torch.tensor(again.scores[block]), torch.tensor(found.scores[block]))


def test_test_time_registers_act_per_image(planted, found):
    _, model, _ = planted
    held = synthetic_images(8, 64, seed=4, **NORM)
    with torch.no_grad(), with_test_time_registers(model, found) as ttr:
        after = patch_features(ttr, held)
        one_by_one = torch.cat([patch_features(ttr, held[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(one_by_one, after)  # each image's own largest activation, whatever the batch


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


def plant_swiglu_unit(eva, images, block: int, unit: int, channel: int) -> None:
    """Make one unit of ``block``'s gated MLP (timm's GluMlp: fc1 gives the value and the gate halves) an artifact
    unit by hand: its gate opens on the 5% of patch tokens that read highest along a random direction, its value is
    1, and it writes a large value into ``channel``."""
    mlp = eva.blocks[block].mlp
    half, seen = mlp.fc2.in_features, []
    gate, value = (unit + half, unit) if mlp.gate_last else (unit, unit + half)
    hook = mlp.fc1.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, eva.num_prefix_tokens:]))
    with torch.no_grad():
        eva(images)
        hook.remove()
        direction = torch.nn.functional.normalize(torch.randn(eva.embed_dim), dim=0)
        reading = seen[0].flatten(0, 1) @ direction
        cut, spread = reading.quantile(0.95), reading.std()
        mlp.fc1.weight[gate], mlp.fc1.bias[gate] = 50 * direction / spread, -50 * cut / spread
        mlp.fc1.weight[value], mlp.fc1.bias[value] = 0, 1
        mlp.fc2.weight[:, unit] = 0
        mlp.fc2.weight[channel, unit] = 20 * seen[0].norm(dim=-1).median()


def test_eva_with_swiglu():
    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=3).eval()
    images = torch.randn(32, 3, 56, 56)
    plant_swiglu_unit(eva, images, block=1, unit=7, channel=5)
    found = find_register_neurons(eva, images)
    assert found.blocks == [1] and found.units == {1: [7]}
    with torch.no_grad():
        expected = patch_features(eva, images)
        with with_test_time_registers(eva, RegisterNeurons(units={})):
            torch.testing.assert_close(patch_features(eva, images), expected, rtol=1e-4, atol=1e-4)
        with with_test_time_registers(eva, found):
            moved = patch_features(eva, images)
            single = patch_features(eva, images[:1])
    assert moved.shape == expected.shape and not torch.allclose(moved, expected)
    torch.testing.assert_close(single, moved[:1])
    before = stream_outliers(eva, images)
    with with_test_time_registers(eva, found) as ttr:
        assert stream_outliers(ttr, images) == 0 < 0.01 < before


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
    assert "artifacts build in block 2, 4 register neurons" in shown and "aligned" in shown
    assert {(b, u) for b, us in RegisterNeurons.load(found).units.items() for u in us} == planted_units(model, twin)
    out = tmp_path / "diagnose"
    assert main(["diagnose", str(tmp_path / "planted"), "--images", str(tmp_path / "images"), "--ttr", str(found),
                 "--reference", str(tmp_path / "twin"), "--out", str(out), "--max_images", "12"]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    before, after = (m["residual"] for m in report["models"])
    assert before["start"] == before["end"] == 2 and before["outliers"][2] > 0.01  # made in block 2, carried on
    assert after["start"] is None and max(after["outliers"]) == 0
    repair = list(report["repair"].values())
    assert repair[1]["artifacts"] > 0.85 > 0.3 > repair[0]["artifacts"]
    shown = capsys.readouterr().out
    assert "Patch cosine to the reference" in shown and "Residual stream per block" in shown and "builds" in shown
    assert (out / "residual.png").is_file() and "Residual stream per block" in (out / "index.html").read_text()
    # a model without artifacts: said in one line, and the file is written saying so
    assert main(["neurons", str(tmp_path / "twin"), "--images", str(tmp_path / "images"), "--out", str(found)]) == 0
    said = " ".join(capsys.readouterr().out.split())  # as one line, however the terminal wraps it
    assert "up to 0.00% high-norm outliers in the residual stream; no artifacts" in said
    assert RegisterNeurons.load(found).blocks == []
