"""TargetCache: fp16 round trip, invalidation on teacher/settings change, no half-written reads."""

import copy

import pytest
import timm
import torch

from retrofit import RetrofitError
from retrofit.cache import TargetCache, teacher_fingerprint
from retrofit.targets import DenoisedTargets, TargetSettings

from .helpers import perturb_

KEYS = ["a/1.jpg", "b/2.png", "c 3"]


@pytest.fixture
def teacher() -> torch.nn.Module:
    return perturb_(timm.create_model("test_vit", pretrained=False, img_size=64, depth=2)).eval()


def cache_for(root, teacher, settings=None, layers=(1,)) -> TargetCache:
    return TargetCache(root, teacher, settings or TargetSettings(), layers, image_size=64, margin=1)


def test_round_trip_within_fp16(tmp_path, teacher):
    cache = cache_for(tmp_path, teacher)
    targets = DenoisedTargets(teacher, layers=[1])(torch.randn(3, 3, 96, 96), margin=1)
    assert cache.get(KEYS) is None
    cache.put(KEYS, targets)
    back = cache.get(KEYS)
    assert back.features.dtype == torch.float32 and back.features.shape == (3, 4, 4, 64)
    assert torch.allclose(back.features, targets.features, rtol=1e-3, atol=1e-3)
    assert torch.allclose(back.layers[1], targets.layers[1], rtol=1e-3, atol=1e-3)
    assert torch.equal(back.coverage, targets.coverage) and torch.equal(back.outliers, targets.outliers)
    one = cache.get(KEYS[1:2])
    assert torch.equal(one.features[0], back.features[1])
    assert cache.get(KEYS + ["never stored"]) is None
    assert cache.path(KEYS[0]).stat().st_size < 4 * 16 * 64 * 2 + 1024  # fp16 on disk


def test_cached_epochs_match_under_cpu_bf16_autocast(tmp_path, teacher):
    """bf16-mixed training on CPU reads the fp16 entries inside autocast; first and later epochs agree."""
    cache, denoiser = cache_for(tmp_path, teacher), DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = cache.get_or_compute(denoiser, images, KEYS)
        later = cache.get_or_compute(denoiser, images, KEYS)
    assert later.features.dtype == torch.float32
    assert torch.equal(first.features, later.features) and torch.equal(first.layers[1], later.layers[1])


def test_teacher_or_settings_change_misses(tmp_path, teacher):
    targets = DenoisedTargets(teacher, layers=[1])(torch.randn(3, 3, 96, 96), margin=1)
    cache_for(tmp_path, teacher).put(KEYS, targets)
    assert cache_for(tmp_path, teacher, TargetSettings(chunk_size=2)).get(KEYS) is not None
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert teacher_fingerprint(changed) != teacher_fingerprint(teacher)
    assert teacher_fingerprint(copy.deepcopy(teacher)) == teacher_fingerprint(teacher)
    assert cache_for(tmp_path, changed).get(KEYS) is None
    assert cache_for(tmp_path, teacher, TargetSettings(num_views=5)).get(KEYS) is None
    assert cache_for(tmp_path, teacher, layers=(0,)).get(KEYS) is None
    assert TargetCache(tmp_path, teacher, TargetSettings(), (1,), image_size=64, margin=0).get(KEYS) is None


def test_half_written_entries_are_never_read(tmp_path, teacher):
    cache = cache_for(tmp_path, teacher)
    denoiser = DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    first = cache.get_or_compute(denoiser, images, KEYS)
    path = cache.path(KEYS[0])
    path.write_bytes(path.read_bytes()[:-100])  # truncated entry
    assert cache.get(KEYS) is None
    path.unlink()
    path.with_name(f".{path.name}.abc.tmp").write_bytes(b"partial")  # a writer died before the rename
    assert cache.get(KEYS) is None
    seen = []
    hook = teacher.patch_embed.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    again = cache.get_or_compute(denoiser, images, KEYS)
    assert sum(seen) >= 1 and seen[0] == 1  # only the missing image went to the teacher
    seen.clear()
    cached = cache.get_or_compute(denoiser, images, KEYS)
    hook.remove()
    assert seen == []
    assert torch.equal(cached.features, again.features)
    assert torch.equal(again.features[1:], first.features[1:])  # fresh targets are rounded like stored ones


def test_mismatched_use_is_one_line_error(tmp_path, teacher):
    cache = cache_for(tmp_path, teacher)
    targets = DenoisedTargets(teacher, layers=[1])(torch.randn(2, 3, 96, 96), margin=1)
    for call in (
        lambda: cache.put(KEYS, targets),
        lambda: cache_for(tmp_path, teacher, layers=()).put(KEYS[:2], targets),
        lambda: cache.get_or_compute(DenoisedTargets(teacher), torch.randn(2, 3, 96, 96), KEYS[:2]),
        lambda: cache.get_or_compute(DenoisedTargets(teacher, layers=[1]), torch.randn(2, 3, 64, 64), KEYS[:2]),
    ):
        with pytest.raises(RetrofitError) as err:
            call()
        assert "\n" not in str(err.value)
