"""RetrofitModule: freeze presets, LoRA merge, optimizer groups, schedules, no-harm, exact resume."""

import copy
import math

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel

from retrofit import RetrofitError, patch_features
from retrofit.data import RetrofitDataModule
from retrofit.metrics import patch_cosine
from retrofit.module import RetrofitModule, _lr_factor
from retrofit.synthetic import plant_artifacts, synthetic_images
from retrofit.targets import TargetSettings

from .helpers import perturb_

FAST = TargetSettings(num_views=3, num_candidates=8)


def vit(size: int = 32, **kwargs) -> torch.nn.Module:
    return perturb_(timm.create_model("test_vit", pretrained=False, img_size=size, patch_size=8, **kwargs)).eval()


def data(n: int = 8, size: int = 32, batch_size: int = 4, shuffle: bool = False) -> RetrofitDataModule:
    """Deterministic batches, or (shuffle=True) random crops in a shuffled order."""
    images = synthetic_images(n, size + 16, seed=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    return RetrofitDataModule.from_tensor(images, img_size=size, batch_size=batch_size, num_workers=0,
                                          random_crop=shuffle, shuffle=shuffle)


def trainer(steps: int, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)
    return L.Trainer(max_steps=steps, **{**defaults, **kwargs})


def trainable(module: RetrofitModule) -> set[str]:
    return {n for n, p in module.student.named_parameters() if p.requires_grad}


def blocks(*indices: int) -> set[str]:
    return {f"blocks.{i}." for i in indices}


EXPECTED = {  # parameter-name prefixes each preset trains on the 6-block test_vit
    "phreg": {"reg_token", "pos_embed", "patch_embed."} | blocks(5),
    "last-k": {"reg_token", "pos_embed"} | blocks(4, 5),
    "lora": {"reg_token", "pos_embed", "lora_"},
    "full": {"cls_token", "reg_token", "pos_embed", "patch_embed.", "norm."} | blocks(*range(6)),
}


def covered(names: set[str], prefixes: set[str]) -> bool:
    return all(any(n.removeprefix("base_model.model.").startswith(p) or p in n for p in prefixes) for n in names)


@pytest.mark.parametrize("freeze", ["phreg", "last-k", "lora", "full"])
def test_freeze_preset_trains_exactly_what_it_names(freeze):
    module = RetrofitModule(vit(), freeze=freeze, last_k=2, lr=1e-2, min_lr=1e-3, targets=FAST)
    names = trainable(module)
    assert covered(names, EXPECTED[freeze])
    for prefix in EXPECTED[freeze]:  # and each named part is really trainable
        assert any(prefix in n for n in names), prefix
    if freeze != "full":
        assert not any(n.endswith(("norm.weight", "norm.bias")) and "blocks" not in n for n in names)
    if freeze == "lora":
        assert not any("patch_embed" in n and "lora" in n for n in names)
        assert {n.split(".lora_")[0].split("blocks.")[1].split(".", 1)[1] for n in names if "lora_" in n} == {
            "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    teacher = copy.deepcopy(module.teacher.state_dict())
    trainer(3).fit(module, datamodule=data())
    changed = {n for n, p in module.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names
    assert all(torch.equal(v, teacher[k]) for k, v in module.teacher.state_dict().items())
    assert not module.teacher.training and module.student.training


def test_phreg_trains_two_blocks_of_a_pre_norm_clip_model():
    module = RetrofitModule(vit(pre_norm=True), freeze="phreg", targets=FAST)
    assert covered(trainable(module), {"reg_token", "pos_embed", "patch_embed."} | blocks(4, 5))
    assert any(n.startswith("blocks.4.") for n in trainable(module))


def spread_plant(size: int = 32) -> torch.nn.Module:
    """test_vit with artifacts built over blocks 2 and 3, two unit groups of 4 in each."""
    torch.manual_seed(0)
    return plant_artifacts(timm.create_model("test_vit", pretrained=False, img_size=size, patch_size=8).eval(),
                           blocks=[2, 3], groups=2, images=synthetic_images(32, size, seed=2, mean=(0.5,) * 3,
                                                                            std=(0.5,) * 3))


def first_lines(caplog) -> list[str]:
    """The run's first lines said, each joined back into one line of text."""
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Artifact source", "Resumed"))]
    assert all(len(row) <= 80 for line in said for row in line.splitlines())  # whole words in 80 columns
    return [" ".join(line.split()) for line in said]


def test_auto_trains_the_registers_and_the_blocks_where_the_artifacts_build(caplog):
    module = RetrofitModule(spread_plant(), lr=1e-2, min_lr=1e-3, targets=FAST, source_images=12)
    assert trainable(module) == {"reg_token"}  # until the data shows where the artifacts build
    trainer(2).fit(module, datamodule=data(n=16))
    found = module.artifact_source
    assert module.artifact_blocks == [2, 3] and module.loss_layers == (2, 3)
    assert covered(trainable(module), {"reg_token"} | blocks(2, 3))
    assert {n.split(".")[1] for n in trainable(module) if n.startswith("blocks.")} == {"2", "3"}
    assert module.neurons is found and set(found.units) == {2, 3} and module.targets.neurons is found
    assert found.images == [f"tensor:{i}" for i in range(12)]  # 12 training images over 3 batches, by key
    for block, units in found.units.items():  # the switched-off units stay off while the rest of fc2 trains
        trained, original = module.student_vit.blocks[block].mlp.fc2.weight, module.teacher.blocks[block].mlp.fc2.weight
        off = torch.zeros(trained.shape[1], dtype=torch.bool)
        off[units] = True
        assert trained[:, off].abs().max() == 0 and original[:, off].abs().max() > 0
        assert (trained[:, ~off] - original[:, ~off]).abs().max() > 1e-4
    said = first_lines(caplog)
    assert len(said) == 1 and said[0].startswith("Artifact source (12 training images): up to ")
    assert f"artifacts build in blocks 2-3, {found.count} register neurons (switched off in the targets, kept off " \
           "in the student); training the registers and blocks 2-3." in said[0]
    caplog.clear()
    clean = RetrofitModule(vit(), targets=FAST)
    trainer(1).fit(clean, datamodule=data())
    assert clean.artifact_blocks == [] and clean.neurons is None and trainable(clean) == {"reg_token"}
    said = first_lines(caplog)
    assert len(said) == 1 and "residual stream, no artifacts; training the registers." in said[0]


def test_a_plain_dataloader_gives_the_images_too():
    """fit(train_dataloaders=...) without a datamodule: Lightning 2.6 keeps that loader only in
    fit_loop._data_source, which the search reads (module.py, _source_images)."""
    teacher, dm = spread_plant(), data(n=16)
    dm.configure_for(teacher, 0)
    dm.setup("fit")
    module = RetrofitModule(teacher, lr=1e-2, min_lr=1e-3, targets=FAST, source_images=10)
    trainer(1).fit(module, train_dataloaders=dm.train_dataloader())
    assert module.artifact_blocks == [2, 3] and module.artifact_source.images == [f"tensor:{i}" for i in range(10)]


@pytest.mark.parametrize("settings", [
    dict(loss_layers=[-1]),  # the last block is the output itself
    dict(loss_layers=[5, 2, -4, 2]),  # the last block, duplicates, a negative index
    dict(artifact_blocks=[5], register_neurons=None),  # artifacts said to build in the last block
    dict(artifact_blocks=[-1, 5, 3]),
])
def test_legal_layer_settings_train(settings):
    module = RetrofitModule(vit(), lr=1e-2, min_lr=1e-3, targets=FAST, **settings)
    trainer(2).fit(module, datamodule=data())
    assert module.global_step == 2 and math.isfinite(float(module.trainer.callback_metrics["train/loss"]))
    assert 5 not in module.loss_layers and len(set(module.loss_layers)) == len(module.loss_layers)
    if "artifact_blocks" in settings:
        assert {n.split(".")[1] for n in trainable(module) if n.startswith("blocks.")} == \
            {str(b % 6) for b in settings["artifact_blocks"]}


def test_nothing_to_train_is_one_line():
    module = RetrofitModule(vit(), num_registers=0, targets=FAST)
    with pytest.raises(RetrofitError, match="nothing to train") as err:
        trainer(2).fit(module, datamodule=data())
    assert "\n" not in str(err.value) and "add registers" in str(err.value)


def test_lora_merges_into_a_plain_timm_model_with_identical_outputs():
    module = RetrofitModule(vit(), freeze="lora", lr=1e-2, min_lr=1e-3, targets=FAST)
    trainer(3).fit(module, datamodule=data())
    assert isinstance(module.student, PeftModel)
    merged = module.export_model()
    assert type(merged) is type(module.teacher) and not any("lora" in k for k in merged.state_dict())
    x = synthetic_images(4, 32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(patch_features(merged, x), module(x.to(module.device)), atol=1e-5, rtol=1e-5)
        assert patch_cosine(patch_features(merged, x), patch_features(module.teacher, x)).mean() < 0.9999


def test_optimizer_groups_scale_patch_embedding_and_skip_decay():
    module = RetrofitModule(vit(), lr=1e-3, min_lr=1e-4, weight_decay=0.05, patch_embed_lr_scale=0.01)
    names = {id(p): n for n, p in module.student.named_parameters()}
    for group in module.param_groups():
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == pytest.approx(1e-5 if name.startswith("patch_embed.") else 1e-3)
            no_decay = p.ndim == 1 or name in ("reg_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_schedules_start_at_lr_and_end_at_min_lr():
    floor = 0.05
    assert _lr_factor(0, 100, 0, "exp", floor) == 1 and _lr_factor(100, 100, 0, "exp", floor) == pytest.approx(floor)
    assert _lr_factor(50, 100, 0, "exp", floor) == pytest.approx(math.sqrt(floor))  # geometric midpoint
    assert _lr_factor(0, 100, 10, "cosine", floor) == pytest.approx(0.1)  # linear warmup
    assert _lr_factor(10, 100, 10, "cosine", floor) == 1
    assert _lr_factor(55, 100, 10, "cosine", floor) == pytest.approx((1 + floor) / 2)
    assert _lr_factor(100, 100, 10, "cosine", floor) == pytest.approx(floor)


def test_loss_layers_come_from_the_same_forward():
    module = RetrofitModule(vit(), loss_layers=[2, -3])
    assert module.loss_layers == (2, 3) and module.targets.layers == (2, 3)
    x = synthetic_images(2, 32, seed=3)
    with torch.no_grad():
        final, l2, l3 = module._student_features(x)
        torch.testing.assert_close(final, patch_features(module.student, x))
        for got, want in zip((l2, l3), patch_features(module.student, x, layers=[2, 3]), strict=True):
            torch.testing.assert_close(got, want)


def test_artifact_free_model_is_not_harmed():
    teacher = vit(64)
    module = RetrofitModule(teacher, register_init="timm", lr=3e-3, min_lr=3e-4, targets=FAST)
    trainer(20).fit(module, datamodule=data(n=16, size=64, batch_size=8))
    held = synthetic_images(16, 64, seed=7, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        cos = patch_cosine(patch_features(module.export_model(), held), patch_features(teacher, held))
    assert cos.mean() >= 0.98


@pytest.mark.parametrize("freeze", ["phreg", "last-k"])
def test_grad_checkpointing_gives_the_same_gradients(freeze):
    teacher, batch = vit(), {"image": synthetic_images(2, 32, seed=2), "key": ["a", "b"]}
    grads = []
    for checkpointing in (False, True):
        module = RetrofitModule(teacher, freeze=freeze, targets=FAST, grad_checkpointing=checkpointing).train()
        module.training_step(batch, 0).backward()
        grads.append({n: p.grad for n, p in module.student.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)
    assert module.student.grad_checkpointing and not module.export_model().grad_checkpointing


class StopAt(L.Callback):
    """Ends fit after ``step`` optimizer steps, as a killed job would (the checkpoint is already written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("freeze", ["auto", "phreg", "lora"])
def test_kill_and_resume_equals_the_uninterrupted_run(freeze, tmp_path, monkeypatch, caplog):
    teacher = vit() if freeze != "auto" else spread_plant()
    settings = dict(freeze=freeze, lr=1e-2, min_lr=1e-3, targets=TargetSettings(num_views=3, num_candidates=8))

    def run(steps, ckpt=None, callbacks=(), said_before=True):
        module = RetrofitModule(teacher, **settings)
        run = trainer(steps, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        if said_before:  # as retrofit's pipeline resumes: the module knows it in setup
            run.ckpt_path, ckpt = ckpt, None
        run.fit(module, datamodule=data(shuffle=True), ckpt_path=ckpt)
        return module

    full = run(4)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    run(4, callbacks=[checkpoint, StopAt(2)])  # killed after one epoch of 2 steps
    path = tmp_path / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=True)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    searches = []
    monkeypatch.setattr("retrofit.module.find_register_neurons", lambda *a, **k: searches.append(a))
    caplog.clear()
    resumed = run(4, ckpt=str(path))
    assert searches == [] and [line.split(":")[0] for line in first_lines(caplog)] == ["Resumed"]
    assert resumed.global_step == 4
    for (name, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(full.targets.get_rng_state(), resumed.targets.get_rng_state())
    assert resumed.artifact_source == full.artifact_source and resumed.loss_layers == full.loss_layers
    assert freeze != "auto" or (full.artifact_blocks == [2, 3] and full.neurons is not None)
    if freeze == "auto":  # told only by fit(ckpt_path=...), setup searches; the checkpoint's findings still win
        monkeypatch.undo()
        caplog.clear()
        again = run(3, ckpt=str(path), said_before=False)
        assert again.artifact_source == full.artifact_source and first_lines(caplog)[-1].startswith("Resumed")


def test_bf16_mixed_precision_on_cpu_trains():
    module = RetrofitModule(vit(), lr=1e-2, min_lr=1e-3, targets=FAST)
    before = module.student.reg_token.detach().clone()
    trainer(2, precision="bf16-mixed").fit(module, datamodule=data())
    assert module.student.reg_token.dtype == torch.float32 and not torch.equal(module.student.reg_token, before)
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_gpu_trains(precision):
    module = RetrofitModule(vit(), lr=1e-2, min_lr=1e-3, targets=FAST)
    trainer(2, accelerator="gpu", devices=1, precision=precision).fit(module, datamodule=data())
    assert module.teacher.pos_embed.device.type == "cuda"
    assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))


def test_unknown_target_setting_names_the_key():
    with pytest.raises(RetrofitError, match="unknown target setting 'bogus'") as err:
        RetrofitModule(vit(), targets={"num_views": 2, "bogus": 1})
    assert "\n" not in str(err.value)


def test_cache_with_random_crops_is_refused_before_training(tmp_path):
    module = RetrofitModule(vit(), targets=FAST, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RetrofitError, match="set data.random_crop false"):
        trainer(2).fit(module, datamodule=data(shuffle=True))
    assert not (tmp_path / "cache").exists()


def test_loss_layer_out_of_range_is_an_error():
    with pytest.raises(RetrofitError, match="layer 7 does not exist"):
        RetrofitModule(vit(), loss_layers=[7])
