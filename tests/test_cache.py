"""TargetCache: fp16 round trip, invalidation on teacher/settings change, no half-written reads."""

import copy

import pytest
import timm
import torch

from retrofit import RetrofitError
from retrofit.cache import TargetCache, teacher_fingerprint
from retrofit.synthetic import plant_artifacts, synthetic_images
from retrofit.targets import DenoisedTargets, TargetSettings

from .helpers import file_size_limit, perturb_

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
    cache, targets = cache_for(tmp_path, teacher), DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = cache.get_or_compute(targets, images, KEYS)
        later = cache.get_or_compute(targets, images, KEYS)
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
    targets = DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    first = cache.get_or_compute(targets, images, KEYS)
    path = cache.path(KEYS[0])
    path.write_bytes(path.read_bytes()[:-100])  # truncated entry
    assert cache.get(KEYS) is None
    path.unlink()
    path.with_name(f".{path.name}.abc.tmp").write_bytes(b"partial")  # a writer died before the rename
    assert cache.get(KEYS) is None
    seen = []
    hook = teacher.patch_embed.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    again = cache.get_or_compute(targets, images, KEYS)
    assert sum(seen) >= 1 and seen[0] == 1  # only the missing image went to the teacher
    seen.clear()
    cached = cache.get_or_compute(targets, images, KEYS)
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


def flip_last_bit(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def test_truncated_corrupt_and_foreign_entries_are_recomputed_and_counted(tmp_path, teacher):
    cache, targets = cache_for(tmp_path, teacher), DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    first = cache.get_or_compute(targets, images, KEYS)
    truncated, corrupt, foreign = (cache.path(k) for k in KEYS)
    foreign.write_bytes(corrupt.read_bytes())  # another image's entry under this key
    truncated.write_bytes(truncated.read_bytes()[:-100])  # a writer killed without the atomic rename
    flip_last_bit(corrupt)

    fresh = TargetCache(tmp_path, teacher, TargetSettings(), (1,), image_size=64, margin=1)
    again = fresh.get_or_compute(targets, images, KEYS)
    assert dict(fresh.counts) == {"unreadable": 1, "corrupt": 1, "foreign": 1, "computed": 3}
    assert fresh.report() == (f"target cache {fresh.dir}: recomputed and rewrote 3 bad entries (1 unreadable, "
                              "1 corrupt, 1 foreign); 0 read, 3 computed.")
    assert again.features.shape == first.features.shape and torch.isfinite(again.features).all()
    reread = TargetCache(tmp_path, teacher, TargetSettings(), (1,), image_size=64, margin=1)
    assert torch.equal(reread.get(KEYS).features, again.features) and reread.report() is None  # rewritten, valid


def test_an_entry_from_another_cache_is_foreign(tmp_path, teacher):
    """Same key and layout, other settings: copied into this cache's folder, it is refused by its tag."""
    images = torch.randn(1, 3, 96, 96)
    mine, theirs = cache_for(tmp_path / "a", teacher), cache_for(tmp_path / "b", teacher, TargetSettings(flip_prob=0))
    theirs.put(KEYS[:1], DenoisedTargets(teacher, theirs.settings, layers=[1])(images, margin=1))
    mine.path(KEYS[0]).parent.mkdir(parents=True)
    mine.path(KEYS[0]).write_bytes(theirs.path(KEYS[0]).read_bytes())
    assert mine.get(KEYS[:1]) is None and mine.counts["foreign"] == 1


def test_a_full_disk_costs_the_cache_not_the_run(tmp_path, teacher):
    cache, targets = cache_for(tmp_path, teacher), DenoisedTargets(teacher, layers=[1])
    images = torch.randn(3, 3, 96, 96)
    with file_size_limit(1000):  # entries are ~5 kB: every write fails half-way
        result = cache.get_or_compute(targets, images, KEYS)
    assert torch.isfinite(result.features).all() and result.features.shape == (3, 4, 4, 64)
    assert cache.counts["unstored"] == 3 and "could not store 3 entries (" in cache.report()
    assert cache.get(KEYS) is None and not list(tmp_path.rglob("*.tmp"))  # nothing half-written was kept


def _fill(root, teacher, seed, barrier, images, out) -> None:
    """One of two processes filling the same cache in step: every batch starts together in both."""
    torch.set_num_threads(1)
    cache = cache_for(root, teacher)
    targets = DenoisedTargets(teacher, layers=[1], seed=seed)  # on its own, each would make other targets
    got = []
    for start in range(0, len(images), 2):
        barrier.wait()
        keys = [f"img{i}" for i in range(start, start + 2)]
        got.append(cache.get_or_compute(targets, images[start:start + 2], keys).features)
    torch.save(torch.cat(got), out)


def test_two_processes_filling_one_cache_end_with_valid_files_and_identical_targets(tmp_path):
    import multiprocessing

    torch.manual_seed(0)
    teacher = plant_artifacts(timm.create_model("test_vit", pretrained=False, img_size=64, patch_size=8).eval(),
                              final_norm=True)  # outliers in the final features: targets draw views for them
    images = synthetic_images(8, 80, seed=1, mean=(0.5,) * 3, std=(0.5,) * 3)  # 64 px and a 1-patch margin
    views = [DenoisedTargets(teacher, layers=[1], seed=s)(images[:2], margin=1).features for s in (1, 2)]
    assert not torch.equal(*views)  # each process alone would store other targets
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    procs = [context.Process(target=_fill, args=(tmp_path, teacher, seed, barrier, images, tmp_path / f"{seed}.pt"))
             for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    one, two = (torch.load(tmp_path / f"{seed}.pt", weights_only=True) for seed in (1, 2))
    assert torch.equal(one, two)
    stored = cache_for(tmp_path, teacher).get([f"img{i}" for i in range(8)])
    assert stored is not None and torch.equal(stored.features, one)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind
