"""The synthetic dataset and its cache, class-balanced batches and tensor-op augmentation."""
import errno

import h5py
import numpy as np
import pytest
import torch

from aomd.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from aomd.data import cache
from aomd.data.cache import cache_file
from aomd.data.errors import DatasetError
from aomd.data.sampler import ClassBalancedBatchSampler
from aomd.data.synthetic import generate, load_synthetic


def test_synthetic_is_deterministic_and_varied():
    images, labels = generate(num_classes=4, images_per_class=5, size=40, seed=3)
    assert images.shape == (20, 40, 40, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, np.repeat(np.arange(4), 5))
    again, _ = generate(num_classes=4, images_per_class=5, size=40, seed=3)
    assert np.array_equal(images, again)
    other, _ = generate(num_classes=4, images_per_class=5, size=40, seed=4)
    assert not np.array_equal(images, other)
    # images of one class differ (pose, colour, clutter), and so do the classes
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5
    assert images.std() > 20


def test_synthetic_splits_are_class_disjoint_halves_and_cached(tmp_path):
    data = load_synthetic(num_classes=10, images_per_class=6, base_size=40, image_size=32, cache_dir=tmp_path)
    assert data.summary() == {"train_images": 30, "test_images": 30, "train_classes": 5, "test_classes": 5}
    assert set(data.train.labels) == set(range(5)) and set(data.test.labels) == set(range(5, 10))
    assert data.train.images.shape == (30, 40, 40, 3) and (data.base_size, data.image_size) == (40, 32)
    (path,) = tmp_path.glob("synthetic-*.h5")
    built = path.stat().st_mtime_ns
    again = load_synthetic(num_classes=10, images_per_class=6, base_size=40, image_size=32, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == built, "the cache is reused, not rebuilt"
    assert np.array_equal(again.test.images, data.test.images)


def test_a_partial_or_stale_cache_is_rebuilt(tmp_path):
    kwargs = dict(num_classes=4, images_per_class=4, base_size=36, image_size=32, cache_dir=tmp_path)
    reference = load_synthetic(**kwargs).train.images
    (path,) = tmp_path.glob("synthetic-*.h5")
    with h5py.File(path, "a") as h5:  # as if the build had been interrupted before the end
        del h5.attrs["complete"]
        h5["train/images"][...] = 0
    assert np.array_equal(load_synthetic(**kwargs).train.images, reference)
    path.write_bytes(path.read_bytes()[:4096])  # truncated (HDF5: "truncated file: ... sblock->base_addr ...")
    assert np.array_equal(load_synthetic(**kwargs).train.images, reference)
    path.write_bytes(b"not an hdf5 file")  # corrupt
    assert np.array_equal(load_synthetic(**kwargs).train.images, reference)


def test_cache_key_separates_settings(tmp_path, monkeypatch):
    a = cache_file(tmp_path, "synthetic", {"seed": 0, "size": 72})
    assert a == cache_file(tmp_path, "synthetic", {"size": 72, "seed": 0})
    assert a != cache_file(tmp_path, "synthetic", {"seed": 1, "size": 72})
    assert a.name == "synthetic-df71ad39cb59.h5"  # format 1's name, as before the version was part of it
    monkeypatch.setattr(cache, "FORMAT_VERSION", 2)  # two versions of the code never rebuild each other's file
    assert cache_file(tmp_path, "synthetic", {"seed": 0, "size": 72}).name == "synthetic-v2-df71ad39cb59.h5"


def test_building_a_cache_names_the_other_caches_of_its_dataset(tmp_path, monkeypatch, caplog):
    """Jobs never delete a cache (another job or code version may read it); a build says which
    others of the same dataset lie beside it, and how large, so a user can reclaim the space."""
    kwargs = dict(num_classes=4, images_per_class=4, base_size=36, image_size=32, cache_dir=tmp_path)
    load_synthetic(**kwargs)
    (first,) = tmp_path.glob("synthetic-*.h5")
    (tmp_path / "synthetic_crops-0123456789ab.h5").write_bytes(b"another dataset's")
    monkeypatch.setattr(cache, "FORMAT_VERSION", 2)
    with caplog.at_level("INFO", logger="aomd.data.cache"):
        load_synthetic(**kwargs)
    (second,) = tmp_path.glob("synthetic-v2-*.h5")
    assert cache.other_caches(second) == [first]
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Other caches")]
    assert message == (f"Other caches named synthetic in {tmp_path} (other settings, roots or aomd versions): {first.name} "
                       f"({first.stat().st_size / 1e9:.1f} GB); delete those no job reads any more.")
    caplog.clear()
    with caplog.at_level("INFO", logger="aomd.data.cache"):
        load_synthetic(**kwargs)  # read, not built: nothing said
    assert not [r for r in caplog.records if r.getMessage().startswith("Other caches")]


def test_a_complete_cache_is_read_where_its_lock_cannot_be_taken(tmp_path, monkeypatch):
    """A cache prepared ahead in a folder the job's user may only read (a group's shared cache):
    complete, it is read without the lock; to build, a one-line error names what to change."""
    kwargs = dict(num_classes=4, images_per_class=4, base_size=36, image_size=32, cache_dir=tmp_path)
    built = load_synthetic(**kwargs).train.images

    real_lock = cache.FileLock

    def unwritable_folder(path, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cache, "FileLock", unwritable_folder)
    assert np.array_equal(load_synthetic(**kwargs).train.images, built)
    with pytest.raises(DatasetError, match=f"Cannot build the dataset cache in {tmp_path} .Permission denied.; "
                                           r"point paths.cache_dir \(or AOMD_CACHE_DIR\) to a folder this user can write"):
        load_synthetic(**{**kwargs, "num_classes": 6})

    def read_only_mount(path, *args):  # the lock file exists and is taken; writing the cache is not allowed
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache, "FileLock", real_lock)
    monkeypatch.setattr(cache, "build_cache", read_only_mount)
    with pytest.raises(DatasetError, match=f"Cannot build the dataset cache in {tmp_path} .Read-only file system."):
        load_synthetic(**{**kwargs, "num_classes": 6})


def test_a_full_disk_or_quota_and_an_unreadable_dataset_file_are_one_line_with_their_own_advice(tmp_path, monkeypatch):
    """A quota full during the build (disk_usage saw room) names the cache; a dataset file this
    user may not read names that file, not the cache folder (which it can write)."""
    from conftest import compose

    from aomd.build import load_data
    from aomd.config import validate

    def quota_exceeded(path, *args):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")  # h5py's, without a file name

    monkeypatch.setattr(cache, "build_cache", quota_exceeded)
    with pytest.raises(DatasetError, match=r"The dataset cache synthetic-\w+\.h5 did not fit in .* \(Disk quota exceeded\); "
                                           r"free space or quota there, or point paths.cache_dir"):
        load_synthetic(num_classes=4, images_per_class=4, base_size=36, image_size=32, cache_dir=tmp_path)

    def unreadable_dataset_file(path, *args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/cub200/images/005.Crested_Auklet")

    def cannot_make_the_cache_folder(path, *args):  # mkdir of paths.cache_dir fails at a folder above it
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path.parent))

    monkeypatch.setattr(cache, "build_cache", cannot_make_the_cache_folder)
    with pytest.raises(DatasetError, match=r"Cannot build the dataset cache in .* point paths.cache_dir"):
        load_synthetic(num_classes=4, images_per_class=4, base_size=36, image_size=32, cache_dir=tmp_path)

    class CacheFolderNotEnterable(type(tmp_path)):  # Path.exists raises there (Python 3.11)
        def exists(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with pytest.raises(DatasetError, match=r"^Cannot read the dataset cache .*x.h5 \(Permission denied\); give this "
                                           r"user read access to it, or point paths.cache_dir"):
        cache.is_complete(CacheFolderNotEnterable(tmp_path / "x.h5"), {})

    monkeypatch.setattr(cache, "build_cache", unreadable_dataset_file)
    cfg = validate(compose("dataset.base_size=36", "dataset.image_size=32", f"dataset.cache_dir={tmp_path}"))
    with pytest.raises(DatasetError, match=r"^Cannot read /data/cub200/images/005.Crested_Auklet \(Permission denied\); "
                                           r"give this user read access to the dataset, or point dataset.root"):
        load_data(cfg.dataset, cfg.train.batch_size, cfg.eval)


def test_class_balanced_batches_follow_the_recipe():
    labels = np.repeat(np.arange(40), 7)
    sampler = ClassBalancedBatchSampler(labels, batch_size=128, images_per_class=5, num_batches=20, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 128 and len(set(batch)) == 128  # no image twice in a batch
        counts = sorted(np.bincount(labels[batch]).tolist(), reverse=True)
        counts = [c for c in counts if c]
        assert counts == [5] * 25 + [3]  # 128 = 25 classes x 5 + 3
    assert batches[0] != batches[1]
    # the classes come in a random order each batch: other classes in each, every class over the epoch
    class_sets = [frozenset(labels[batch].tolist()) for batch in batches]
    assert len(set(class_sets)) == 20 and frozenset().union(*class_sets) == set(range(40))


def test_small_classes_give_what_they_have():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    batch = next(iter(ClassBalancedBatchSampler(labels, batch_size=6, images_per_class=4, num_batches=1, seed=0)))
    assert len(batch) == 6 and sorted(np.bincount(labels[batch]).tolist()) in ([2, 4], )


def test_a_batch_of_more_than_one_pass_over_the_classes_repeats_no_image_it_can_avoid():
    # 20 classes x 5 fill 100 of 128: a second pass takes images the batch does not hold yet
    labels = np.repeat(np.arange(20), 10)
    for batch in ClassBalancedBatchSampler(labels, batch_size=128, images_per_class=5, num_batches=5, seed=0):
        assert len(batch) == 128 and len(set(batch)) == 128
        assert np.bincount(labels[batch]).max() <= 10
    # 3 classes x 2 images, batches of 8: repeats are unavoidable, but every image is in the batch
    labels = np.repeat(np.arange(3), 2)
    for batch in ClassBalancedBatchSampler(labels, batch_size=8, images_per_class=2, num_batches=5, seed=0):
        assert len(batch) == 8 and set(batch) == set(range(6))


def test_train_transform_crops_flips_and_normalises():
    images = torch.arange(2 * 6 * 6 * 3, dtype=torch.uint8).reshape(2, 6, 6, 3)
    out = train_transform(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = (out * std + mean) * 255  # back to pixel values
    for b in range(2):
        source = images[b].permute(2, 0, 1).float()
        windows = [source[:, t:t + 4, l:l + 4] for t in range(3) for l in range(3)]
        windows += [w.flip(2) for w in windows]
        assert any(torch.allclose(raw[b], w, atol=1e-3) for w in windows)
    # over many draws both flips and several offsets occur
    seen = {tuple(train_transform(images[:1], 4, torch.Generator().manual_seed(s))[0, 0, 0, :2].tolist()) for s in range(40)}
    assert len(seen) > 4


def test_cpu_and_accelerator_paths_of_train_transform_agree():
    from aomd.data.augment import _crop_flip_normalise_cpu, _crop_flip_normalise_gather

    images = torch.randint(0, 255, (5, 9, 9, 3), dtype=torch.uint8)
    top, left = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([3, 0, 2, 1, 1])
    flip = torch.tensor([True, False, True, False, True])
    assert torch.allclose(_crop_flip_normalise_cpu(images, 6, top, left, flip),
                          _crop_flip_normalise_gather(images, 6, top, left, flip), atol=1e-5)


def test_eval_transform_is_the_centre_crop():
    images = torch.randint(0, 255, (3, 8, 8, 3), dtype=torch.uint8)
    out = eval_transform(images, 4)
    expected = eval_transform(images[:, 2:6, 2:6], 4)
    assert torch.equal(out, expected) and out.shape == (3, 3, 4, 4)


def test_a_skipping_sampler_yields_the_rest_of_the_same_epoch():
    labels = np.repeat(np.arange(6), 5)
    whole = list(ClassBalancedBatchSampler(labels, 8, 2, num_batches=5, seed=1))
    resumed = ClassBalancedBatchSampler(labels, 8, 2, num_batches=5, seed=1)
    resumed.skip(3)
    assert list(resumed) == whole[3:]
    # the next epoch is whole again, and the same as an unskipped sampler's next epoch
    reference = ClassBalancedBatchSampler(labels, 8, 2, num_batches=5, seed=1)
    list(reference)
    assert list(resumed) == list(reference)


def _split(n: int = 24):
    from aomd.data.splits import ImageSplit

    return ImageSplit(np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3) % 251, np.repeat(np.arange(n // 4), 4))


def test_iterating_a_loader_leaves_the_global_random_state_alone():
    from aomd.data.loader import eval_loader, train_loader

    state = torch.get_rng_state()
    for loader in (eval_loader(_split(), 8), train_loader(_split(), 8, 2, 3, seed=0)):
        for _ in range(2):
            list(loader)
    # the training steps draw from it (negative sampling): a resumed epoch must find it as saved
    assert torch.equal(torch.get_rng_state(), state)


def test_a_loader_starts_no_more_workers_than_a_pass_has_batches():
    from aomd.data.loader import eval_loader, train_loader

    assert eval_loader(_split(), 10, num_workers=8).num_workers == 3  # 24 images: batches of 10, 10, 4
    assert eval_loader(_split(), 32, num_workers=8).num_workers == 1
    assert train_loader(_split(), 8, 2, 2, seed=0, num_workers=8).num_workers == 2
    assert train_loader(_split(), 8, 2, 50, seed=0, num_workers=8).num_workers == 8
    assert eval_loader(_split(), 10).num_workers == 0


def test_loader_workers_ignore_the_stop_signals(tmp_path):
    """SLURM signals every process of a job; a worker must neither die nor run the training
    process's handlers (submitit's would requeue the job a second time)."""
    import os
    import signal
    import time

    from aomd.data.loader import eval_loader

    parent, marker = os.getpid(), tmp_path / "handled-in-a-worker"
    previous = signal.signal(signal.SIGUSR2, lambda *_: marker.touch() if os.getpid() != parent else None)
    try:
        loader = eval_loader(_split(), 4, num_workers=1)
        batches = iter(loader)
        first = next(batches)
        (worker,) = batches._workers
        for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, signum)
        time.sleep(0.5)
        rest = list(batches)
        assert worker.is_alive() and not marker.exists()
        assert sum(len(labels) for _, labels in [first, *rest]) == 24
        del batches, loader
    finally:
        signal.signal(signal.SIGUSR2, previous)
