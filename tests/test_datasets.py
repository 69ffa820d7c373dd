"""The dataset loaders on small fixtures in each real layout (real JPEGs, a real .mat, real text
files): split rules, labels, counts, the packed cache, bad input, and short training runs."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from aomd.data import benchmarks, cache, packing
from aomd.data.benchmarks import load_cars196, load_cub200, load_sop
from aomd.data.cars196_classes import CARS196_CLASSES
from aomd.data.errors import BadImageError, DatasetError
from aomd.data.folder import load_folder
from aomd.data.images import decode_all
from aomd.data.layout import Expected, check_counts
from aomd.errors import ConfigError

BASE, CROP = 40, 32  # fixture images are packed at 40 px; training crops 32 px
SOP_SUPER = ("bicycle", "chair", "kettle")


# --- fixtures in the real layouts --------------------------------------------------------------

def write_jpeg(path: Path, seed: int, size=(24, 18)) -> None:
    """A real, tiny JPEG whose colours depend on `seed` (so classes are told apart)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.uniform(0, 1, (size[1], size[0], 3)) * 80 + rng.uniform(0, 175, 3)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def cars_images_per_class(class_id: int) -> int:
    return 1 + class_id % 2  # 1 or 2 images: classes 1..196 give 294 images


def make_cub(tmp: Path) -> Path:
    """CUB_200_2011/ with all 200 classes, 2 images each; returns the folder holding it."""
    root = tmp / "CUB_200_2011"
    classes, images, labels = [], [], []
    image_id = 0
    for class_id in range(1, 201):
        class_name = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {class_name}")
        for k in range(2):
            image_id += 1
            relative = f"{class_name}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            write_jpeg(root / "images" / relative, image_id)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return tmp


def make_cars_mat(tmp: Path) -> Path:
    """car_ims/*.jpg and cars_annos.mat (struct array `annotations`, `class_names`), all 196 classes."""
    root = tmp / "cars"
    rows = []
    for class_id in range(1, 197):
        for _ in range(cars_images_per_class(class_id)):
            relative = f"car_ims/{len(rows) + 1:06d}.jpg"
            write_jpeg(root / relative, len(rows))
            rows.append((relative, 1, 2, 20, 15, class_id, len(rows) % 2))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        annotations[0, i] = row
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = CARS196_CLASSES
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def make_cars_folders(tmp: Path) -> Path:
    """The Kaggle class-folder layout: train/<class name>/ and test/<class name>/ ("/" -> "-")."""
    root = tmp / "cars_folders"
    n = 0
    for class_id, name in enumerate(CARS196_CLASSES, start=1):
        for k in range(cars_images_per_class(class_id)):
            n += 1
            split = "train" if k == 0 else "test"
            write_jpeg(root / split / name.replace("/", "-") / f"{n:06d}.jpg", n)
    return root


def make_sop(tmp: Path) -> Path:
    """Stanford_Online_Products/ with 6 train classes (ids 1..6) and 6 test classes (11319..)."""
    root = tmp / "Stanford_Online_Products"
    image_id = 0
    for split, first_class in (("train", 1), ("test", 11319)):
        lines = ["image_id class_id super_class_id path"]
        for c in range(6):
            class_id, super_id = first_class + c, c % len(SOP_SUPER) + 1
            for k in range(3):
                image_id += 1
                relative = f"{SOP_SUPER[super_id - 1]}_final/{100000 + class_id}_{k}.JPG"
                write_jpeg(root / relative, image_id)
                lines.append(f"{image_id} {class_id} {super_id} {relative}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp


def make_folder(tmp: Path, classes: int = 6, per_class: int = 3) -> Path:
    root = tmp / "collection"
    for c in range(classes):
        for k in range(per_class):
            write_jpeg(root / f"class_{c:02d}" / f"img{k}.jpg", c * 10 + k)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def options(tmp: Path, **overrides):
    return {"base_size": BASE, "image_size": CROP, "cache_dir": tmp / "cache", "in_memory": False,
            "decode_workers": 1, "progress": False, **overrides}


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return make_cub(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="module")
def cars_mat_root(tmp_path_factory) -> Path:
    return make_cars_mat(tmp_path_factory.mktemp("cars"))


@pytest.fixture(scope="module")
def cars_folder_root(tmp_path_factory) -> Path:
    return make_cars_folders(tmp_path_factory.mktemp("cars_folders"))


@pytest.fixture(scope="module")
def sop_root(tmp_path_factory) -> Path:
    return make_sop(tmp_path_factory.mktemp("sop"))


# --- split rules, labels, counts ----------------------------------------------------------------

def test_cub200_split_is_classes_1_to_100_vs_101_to_200(cub_root, tmp_path):
    before = snapshot(cub_root)
    data = load_cub200(cub_root, **options(tmp_path))
    assert data.name == "cub200" and data.base_size == BASE and data.image_size == CROP
    assert np.array_equal(np.unique(data.train.labels), np.arange(100))
    assert np.array_equal(np.unique(data.test.labels), np.arange(100, 200))
    assert len(data.train) == len(data.test) == 200
    assert data.train.images.shape == (200, BASE, BASE, 3)
    # labels follow image_class_labels.txt: the class folder of each path is its class id
    for path, label in zip(data.train.paths + data.test.paths, np.concatenate([data.train.labels, data.test.labels])):
        assert Path(path).parent.name.startswith(f"{label + 1:03d}.") and Path(path).is_file()
    batch = data.train.take([5, 0, 5])
    assert batch.dtype == np.uint8 and batch.shape == (3, BASE, BASE, 3)
    assert np.array_equal(batch[0], batch[2])
    assert snapshot(cub_root) == before, "nothing under dataset.root may change"


def test_cub200_accepts_the_extracted_folder_itself(cub_root, tmp_path):
    data = load_cub200(cub_root / "CUB_200_2011", **options(tmp_path))
    assert len(data.train) == 200


def test_cars196_mat_layout_split_is_classes_1_to_98_vs_99_to_196(cars_mat_root, tmp_path):
    data = load_cars196(cars_mat_root, **options(tmp_path))
    assert np.array_equal(np.unique(data.train.labels), np.arange(98))
    assert np.array_equal(np.unique(data.test.labels), np.arange(98, 196))
    assert len(data.train) == sum(cars_images_per_class(c) for c in range(1, 99))
    assert len(data.test) == sum(cars_images_per_class(c) for c in range(99, 197))
    # the .mat's `test` flag (the classification split) is ignored: both halves of it are used
    assert all(Path(p).parent.name == "car_ims" for p in data.train.paths)


def test_cars196_mat_class_ids_saved_as_doubles_are_read(tmp_path):
    """A cars_annos.mat re-saved by MATLAB or Octave holds its class ids as doubles."""
    annotations = np.zeros((1, 3), dtype=[("relative_im_path", "O"), ("class", "O")])
    for i, class_id in enumerate((1.0, 98.0, 196.0)):
        annotations[0, i] = (f"car_ims/{i + 1:06d}.jpg", np.float64(class_id))
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    files, labels = benchmarks._cars196_from_mat(tmp_path)
    assert labels == [1, 98, 196] and files[2] == tmp_path / "car_ims" / "000003.jpg"
    annotations[0, 0] = ("car_ims/000001.jpg", np.float64(1.5))
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    with pytest.raises(DatasetError, match="has '1.5' where a class id"):
        benchmarks._cars196_from_mat(tmp_path)


def test_cars196_class_folder_layout_gives_the_same_split(cars_mat_root, cars_folder_root, tmp_path):
    mat = load_cars196(cars_mat_root, **options(tmp_path))
    folders = load_cars196(cars_folder_root, **options(tmp_path))
    for split in ("train", "test"):
        a, b = getattr(mat, split), getattr(folders, split)
        assert np.array_equal(np.bincount(a.labels, minlength=196), np.bincount(b.labels, minlength=196))
    # the folder names are the class names in the original order, "Ram C/V" included
    ram = CARS196_CLASSES.index("Ram C/V Cargo Van Minivan 2012")
    ram_paths = [p for p, label in zip(folders.test.paths, folders.test.labels) if label == ram]
    assert ram_paths and all("Ram C-V Cargo Van" in p for p in ram_paths)
    first = [p for p, label in zip(folders.train.paths, folders.train.labels) if label == 0]
    assert first and all("AM General Hummer SUV 2000" in p for p in first)


def test_cars196_class_folders_named_by_class_id(tmp_path):
    root = tmp_path / "numbered"
    for class_id in range(1, 197):
        write_jpeg(root / ("train" if class_id % 2 else "test") / f"{class_id:03d}" / "a.jpg", class_id)
    data = load_cars196(root, **options(tmp_path))
    assert sorted(set(data.train.labels.tolist())) == list(range(98))
    assert sorted(set(data.test.labels.tolist())) == list(range(98, 196))
    # a number before a class name is not the class id where the name says otherwise (alphabetical numbering)
    assert benchmarks._cars196_class_id("002.Acura Integra Type R 2001") == CARS196_CLASSES.index("Acura Integra Type R 2001") + 1 == 6
    assert benchmarks._cars196_class_id("001.AM General Hummer SUV 2000") == 1
    assert benchmarks._cars196_class_id("005.Not A Car 2020") is None  # unknown, not class 5
    write_jpeg(root / "test" / "002.Acura RL Sedan 2012" / "b.jpg", 2)  # test/002 is class 2 already
    with pytest.raises(DatasetError, match="test/002 and test/002.Acura RL Sedan 2012 .* are both class 2"):
        load_cars196(root, **options(tmp_path))


def test_cars196_class_folders_nested_by_a_slash_in_the_name_and_missing_ones(cars_folder_root, tmp_path):
    """An extraction that made "Ram C/V Cargo Van Minivan 2012" two folders keeps the class;
    a class with no folder at all is an error naming it, not a split one class short."""
    root = tmp_path / "cars"
    shutil.copytree(cars_folder_root, root)
    ram = CARS196_CLASSES.index("Ram C/V Cargo Van Minivan 2012")
    for split in ("train", "test"):
        flat = root / split / "Ram C-V Cargo Van Minivan 2012"
        if flat.is_dir():
            (root / split / "Ram C").mkdir()
            flat.rename(root / split / "Ram C" / "V Cargo Van Minivan 2012")
    data = load_cars196(root, **options(tmp_path))
    assert np.count_nonzero(data.test.labels == ram) == cars_images_per_class(ram + 1)
    for split in ("train", "test"):
        shutil.rmtree(root / split / "Ram C", ignore_errors=True)
    with pytest.raises(DatasetError, match="1 of the 196 classes have no image folder.*class 174, 'Ram C/V Cargo Van"):
        load_cars196(root, **options(tmp_path))


def test_cars196_unknown_class_folder_is_an_error(tmp_path):
    root = tmp_path / "cars"
    write_jpeg(root / "train" / "Some Car 2020" / "a.jpg", 1)
    (root / "test").mkdir()
    with pytest.raises(DatasetError, match="not Cars196 class names.*Some Car 2020"):
        load_cars196(root, **options(tmp_path))


def test_sop_splits_are_the_two_files(sop_root, tmp_path):
    data = load_sop(sop_root, **options(tmp_path))
    assert np.array_equal(np.unique(data.train.labels), np.arange(6))
    assert np.array_equal(np.unique(data.test.labels), np.arange(11318, 11324))
    assert len(data.train) == len(data.test) == 18
    assert all(Path(p).name.startswith(f"{100001 + label}_") for p, label in zip(data.train.paths, data.train.labels))


def test_sop_rejects_files_sharing_classes(sop_root, tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    root.mkdir()
    source = sop_root / "Stanford_Online_Products"
    (root / "Ebay_train.txt").write_text((source / "Ebay_train.txt").read_text())
    (root / "Ebay_test.txt").write_text((source / "Ebay_train.txt").read_text())
    with pytest.raises(DatasetError, match="share 6 classes"):
        load_sop(root, **options(tmp_path))


def test_sop_files_whose_extension_is_lower_case_on_disk_are_read(sop_root, tmp_path, caplog):
    """Ebay_*.txt lists .JPG files; some mirrors hold them as .jpg."""
    root = tmp_path / "Stanford_Online_Products"
    shutil.copytree(sop_root / "Stanford_Online_Products", root)
    for path in root.rglob("*.JPG"):
        path.rename(path.with_suffix(".jpg"))
    with caplog.at_level(logging.INFO, logger="aomd.data.packing"):
        data = load_sop(root, **options(tmp_path))
    assert len(data.train) == 18 and all(path.endswith(".jpg") and os.path.isfile(path) for path in data.train.paths)
    assert "36 files listed in Ebay_train.txt and Ebay_test.txt end in another case on disk" in caplog.text


def test_sop_lists_without_their_header_line_lose_no_image(sop_root, tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    shutil.copytree(sop_root / "Stanford_Online_Products", root)
    for split, byte_order_mark in (("train", ""), ("test", "\ufeff")):  # as an editor on Windows may save it
        listing = root / f"Ebay_{split}.txt"
        listing.write_text(byte_order_mark + "".join(listing.read_text().splitlines(keepends=True)[1:]), encoding="utf-8")
    data = load_sop(root, **options(tmp_path))
    assert (len(data.train), len(data.test)) == (18, 18)


def test_folder_splits_by_sorted_class_name(tmp_path):
    root = make_folder(tmp_path, classes=6)
    data = load_folder(root, train_fraction=0.5, **options(tmp_path))
    assert np.array_equal(np.unique(data.train.labels), [0, 1, 2])
    assert np.array_equal(np.unique(data.test.labels), [3, 4, 5])
    assert all("class_0" in p and int(Path(p).parent.name[-2:]) < 3 for p in data.train.paths)
    data = load_folder(root, train_fraction=0.34, **options(tmp_path))
    assert len(np.unique(data.train.labels)) == 2 and len(np.unique(data.test.labels)) == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names of any bytes: Linux file systems")
def test_a_file_name_that_is_not_utf8_is_packed_and_read_back(tmp_path):
    """A zip extracted without its UTF-8 flag leaves names such as b"caf\\xe9.jpg" (Latin-1)."""
    root = make_folder(tmp_path, classes=4, per_class=2)
    latin1 = os.fsencode(root / "class_00") + b"/caf\xe9.jpg"
    write_jpeg(root / "class_00" / "new.jpg", 99)
    os.rename(os.fsencode(root / "class_00" / "new.jpg"), latin1)
    for _ in range(2):  # built, then read from the cache
        data = load_folder(root, **options(tmp_path))
        assert len(data.train) == 5 and os.fsdecode(latin1) in data.train.paths
        assert all(os.path.isfile(path) for path in data.train.paths)


def test_class_folders_added_under_a_root_train_a_new_teacher(tmp_path):
    """The managed teacher's folder follows the files under `dataset.root`: classes added there
    move the split (a class the old teacher trained on is now a test class), and the old teacher
    must not be reused."""
    from aomd.teachers import default_teacher_dir
    from conftest import compose

    root = make_folder(tmp_path, classes=6)
    cfg = compose("dataset=folder", f"dataset.root={root}")
    before = load_folder(root, train_fraction=0.5, **options(tmp_path))
    again = load_folder(root, train_fraction=0.5, **options(tmp_path))
    assert default_teacher_dir(cfg, before.files_digest) == default_teacher_dir(cfg, again.files_digest)
    for c in range(2):
        write_jpeg(root / f"a_class_{c}" / "img0.jpg", 100 + c)
        write_jpeg(root / f"a_class_{c}" / "img1.jpg", 200 + c)
    after = load_folder(root, train_fraction=0.5, **options(tmp_path))
    assert set(before.train.paths) - set(after.train.paths)  # an old training class is a test class now
    assert default_teacher_dir(cfg, before.files_digest) != default_teacher_dir(cfg, after.files_digest)


def test_a_job_looks_for_its_teacher_by_its_files_and_names_one_an_earlier_version_trained(tmp_path):
    from aomd.runtime import Runtime
    from aomd.teachers import default_teacher_dir, teacher_checkpoint
    from conftest import compose

    root = make_folder(tmp_path, classes=6)
    cfg = compose("dataset=folder", f"dataset.root={root}", f"paths.teachers_dir={tmp_path / 'teachers'}",
                  "teacher.train_if_missing=false")
    data = load_folder(root, train_fraction=0.5, **options(tmp_path))
    expected = default_teacher_dir(cfg, data.files_digest) / "checkpoints" / "best.pt"
    with pytest.raises(ConfigError) as error:
        teacher_checkpoint(cfg, data, Runtime.resolve("cpu"))
    assert str(error.value).startswith(f"No teacher at {expected} and teacher.train_if_missing=false;")
    assert "earlier version" not in str(error.value)
    # a teacher in the folder an earlier version gave it (no files in its identity) is named, not used
    earlier = default_teacher_dir(cfg) / "checkpoints" / "best.pt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"")
    (earlier.parent.parent / "metrics.json").write_text('{"status": "finished"}')
    with pytest.raises(ConfigError, match=f"is at {earlier}: pass teacher.checkpoint={earlier} to use it"):
        teacher_checkpoint(cfg, data, Runtime.resolve("cpu"))


def test_folder_uses_explicit_train_and_test_folders(tmp_path):
    root = tmp_path / "explicit"
    for split, names in (("train", ["b", "a"]), ("test", ["c", "d", "e"])):
        for name in names:
            for k in range(2):
                write_jpeg(root / split / name / f"{k}.png", ord(name) + k)
    data = load_folder(root, **options(tmp_path))
    assert data.train.num_classes == 2 and data.test.num_classes == 3
    assert all("/train/" in p for p in data.train.paths) and all("/test/" in p for p in data.test.paths)
    assert set(data.train.labels.tolist()).isdisjoint(data.test.labels.tolist())


def test_folder_needs_class_folders(tmp_path):
    root = tmp_path / "flat"
    write_jpeg(root / "a.jpg", 1)
    with pytest.raises(DatasetError, match=f"folder: {root} holds 1 image directly, not in class folders; expected "):
        load_folder(root, **options(tmp_path))


def test_folder_names_a_better_root_when_the_classes_are_near(tmp_path):
    """dataset.root one class's folder, or the class folders a few levels further down: the
    error says where they are."""
    nested = tmp_path / "nested"
    for name in ("a", "b", "c"):
        for k in range(2):
            write_jpeg(nested / "data" / "images" / name / f"{k}.jpg", k)
    classes = nested / "data" / "images"
    with pytest.raises(DatasetError, match=f"holds 0 class folders with images, where at least 2 are needed; .*"
                                           f"\\(class folders are in {classes}: set dataset.root={classes}\\)"):
        load_folder(nested, **options(tmp_path))
    with pytest.raises(DatasetError, match=f"{classes / 'a'} holds 2 images directly, not in class folders; .*"
                                           f"\\(class folders are in {classes}: set dataset.root={classes}\\)"):
        load_folder(classes / "a", **options(tmp_path))
    # train/ and val/ (a common layout): the test classes' folder is to be named test/
    split = tmp_path / "split"
    for folder in ("train", "val"):
        for name in ("a", "b"):
            write_jpeg(split / folder / f"{folder}_{name}" / "0.jpg", 0)
    with pytest.raises(DatasetError, match=re.escape(f"(train/ has no test/ beside it: rename val/ to test/ to test on "
                                                     f"its classes, or set dataset.root={split / 'train'} to split "
                                                     f"train/'s classes)")):
        load_folder(split, **options(tmp_path))


def test_files_of_other_kinds_in_class_folders_are_named(tmp_path, caplog):
    """A phone's .heic photos among the JPEGs would silently shrink their classes."""
    root = make_folder(tmp_path, classes=4, per_class=3)
    for name in ("class_00/IMG_1.HEIC", "class_00/IMG_2.heic", "class_02/notes.txt", "class_02/.DS_Store"):
        (root / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        data = load_folder(root, **options(tmp_path))
    assert len(data.train) + len(data.test) == 12
    assert f"Ignoring 3 files of other kinds than .bmp/.gif/.jpeg/.jpg/.png/.tif/.tiff/.webp in the class folders of " \
           f"{root} (.heic: 2, .txt: 1); convert those that are images." in caplog.text


def test_published_counts_are_checked_on_the_full_dataset(cub_root, caplog):
    listing = benchmarks.list_cub200(cub_root)
    caplog.set_level(logging.INFO)
    check_counts(listing)  # 400 of 11,788 images: a partial dataset, counts only logged
    assert "400 of the 11788 images" in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    listing.expected = Expected(images=400, train_classes=100, train_images=200, test_classes=100, test_images=200)
    caplog.clear()
    check_counts(listing)
    assert "as published" in caplog.text
    listing.expected = Expected(images=400, train_classes=98, train_images=196, test_classes=102, test_images=204)
    caplog.clear()
    check_counts(listing)
    assert "splits differ from the published ones" in caplog.text
    assert caplog.records[-1].levelno == logging.WARNING


# --- the packed cache ---------------------------------------------------------------------------

def test_later_runs_read_only_the_cache(cub_root, tmp_path, monkeypatch):
    first = load_cub200(cub_root, **options(tmp_path))
    files = sorted((tmp_path / "cache").glob("*.h5"))
    assert len(files) == 1 and files[0].name.startswith("cub200-")
    with h5py.File(files[0], "r") as h5:
        assert h5["train/images"].dtype == np.uint8 and h5["train/images"].shape == (200, BASE, BASE, 3)
        assert h5["test/labels"].dtype == np.int64 and len(h5["test/paths"]) == 200
        assert h5.attrs["complete"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("a complete cache must not be decoded again")

    monkeypatch.setattr(packing, "decode_all", no_decoding)
    second = load_cub200(cub_root, **options(tmp_path, in_memory=True))
    assert isinstance(second.train.images, np.ndarray)
    assert np.array_equal(second.train.images[:7], first.train.take(np.arange(7)))
    assert second.test.paths == first.test.paths


def test_cache_key_covers_size_and_files(tmp_path):
    root = make_folder(tmp_path, classes=4, per_class=2)
    load_folder(root, **options(tmp_path))
    load_folder(root, **options(tmp_path, base_size=36))
    assert len(list((tmp_path / "cache").glob("folder-*.h5"))) == 2
    write_jpeg(root / "class_04" / "new.jpg", 99)  # a new class: another listing, another cache
    data = load_folder(root, **options(tmp_path))
    assert data.train.num_classes + data.test.num_classes == 5
    assert len(list((tmp_path / "cache").glob("folder-*.h5"))) == 3


def test_partial_or_stale_cache_is_rebuilt(tmp_path, caplog):
    root = make_folder(tmp_path, classes=4, per_class=2)
    load_folder(root, **options(tmp_path))
    (path,) = (tmp_path / "cache").glob("folder-*.h5")
    with h5py.File(path, "a") as h5:  # as if packing had been interrupted before the end
        del h5.attrs["complete"]
        del h5["test"]
    leftover = path.with_name(path.name + ".tmp-12345")  # a build killed outright leaves this
    leftover.write_bytes(b"partial")
    caplog.set_level(logging.INFO)
    data = load_folder(root, **options(tmp_path))
    assert "stale or incomplete" in caplog.text
    assert len(data.test) == 4 and not leftover.exists()
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file
    assert len(load_folder(root, **options(tmp_path)).test) == 4


def test_parallel_decoding_keeps_the_order(tmp_path):
    paths = []
    for i in range(70):
        paths.append(tmp_path / f"{i}.jpg")
        write_jpeg(paths[-1], i, size=(30 + i % 5, 20))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    paths.insert(33, tmp_path / "bad.jpg")
    serial = list(decode_all(paths, 16, workers=1, chunk_size=8))
    parallel = list(decode_all(paths, 16, workers=2, chunk_size=8))
    assert [c.start for c in parallel] == list(range(0, 71, 8))
    assert np.array_equal(np.concatenate([c.images for c in serial]), np.concatenate([c.images for c in parallel]))
    assert [f for c in parallel for f in c.failed][0][0] == 33


def test_streamed_writer_shrinks_to_what_was_written(tmp_path):
    with h5py.File(tmp_path / "w.h5", "w") as h5:
        writer = cache.SplitWriter(h5, "train", capacity=10, size=8)
        writer.append(np.ones((4, 8, 8, 3), np.uint8))
        writer.append(np.zeros((3, 8, 8, 3), np.uint8))
        writer.finish(np.arange(7), [f"f{i}" for i in range(7)])
    split = cache.read_split(tmp_path / "w.h5", "train", in_memory=True)
    assert split.images.shape == (7, 8, 8, 3) and split.paths[6] == "f6"
    assert split.images[:4].min() == 1 and split.images[4:].max() == 0


def test_on_demand_reader_reads_any_index_array(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "r.h5", "w") as h5:
        cache.write_split(h5, "train", images, np.zeros(50))
    reader = cache.H5Images(tmp_path / "r.h5", "train")
    for index in ([3, 4, 5, 9, 10, 49], [7], list(range(50)), [5, 3, 3, -1], np.array([], dtype=np.int64)):
        assert np.array_equal(reader[np.asarray(index)], images[np.asarray(index, dtype=np.int64)])
    assert np.array_equal(reader[4], images[4]) and np.array_equal(reader[2:9], images[2:9])
    with pytest.raises(IndexError):
        reader[np.array([50])]


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("skip_bad_images", "maybe"), ("in_memory", 1), ("base_size", 0),
                                        ("image_size", 64), ("decode_workers", -1)])
def test_wrong_option_values_name_the_key(tmp_path, key, value):
    root = make_folder(tmp_path, classes=2, per_class=1)
    with pytest.raises(ConfigError, match=f"dataset.{key} must be"):
        load_folder(root, **options(tmp_path, **{key: value}))


def test_missing_root_names_the_layout_and_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_cub200(tmp_path / "nowhere", **options(tmp_path))
    message = str(error.value)
    assert "no images.txt" in message and "images/<NNN.Class_Name>" in message
    assert "the folder does not exist" in message and "Caltech" in message
    assert "\n" not in message


def test_missing_annotation_file_names_the_layout_found_and_source(cub_root, tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    for name in ("images.txt", "classes.txt"):
        (root / name).write_text((cub_root / "CUB_200_2011" / name).read_text())
    (root / "images").symlink_to(cub_root / "CUB_200_2011" / "images")
    with pytest.raises(DatasetError) as error:
        load_cub200(root, **options(tmp_path))
    message = str(error.value)
    assert "image_class_labels.txt is missing" in message  # what is wrong
    assert "expected CUB_200_2011/ holding images.txt, image_class_labels.txt" in message  # the layout
    assert "classes.txt, images/, images.txt" in message  # what was found
    assert "CUB_200_2011.tgz" in message and "Caltech" in message  # where to get it
    assert "\n" not in message


def test_missing_sop_test_list_and_cars_annotations(sop_root, tmp_path):
    root = tmp_path / "sop"
    root.mkdir()
    (root / "Ebay_train.txt").write_text((sop_root / "Stanford_Online_Products" / "Ebay_train.txt").read_text())
    with pytest.raises(DatasetError, match="Ebay_test.txt is missing.*mirror"):
        load_sop(root, **options(tmp_path))
    (tmp_path / "cars" / "car_ims").mkdir(parents=True)
    with pytest.raises(DatasetError, match="neither cars_annos.mat nor train/ and test/.*found in .*car_ims/.*Kaggle"):
        load_cars196(tmp_path / "cars", **options(tmp_path))


def test_wrong_root_points_to_the_right_one(cub_root, sop_root, cars_folder_root, tmp_path):
    with pytest.raises(DatasetError, match=r"images.txt is in .*CUB_200_2011: set dataset.root="):
        load_cub200(cub_root.parent, **options(tmp_path))
    # a root set one level too low, to one of the dataset's own folders
    for load, root, dataset_root in ((load_cub200, cub_root / "CUB_200_2011" / "images", cub_root / "CUB_200_2011"),
                                     (load_sop, sop_root / "Stanford_Online_Products" / "bicycle_final",
                                      sop_root / "Stanford_Online_Products"),
                                     (load_cars196, cars_folder_root / "train", cars_folder_root)):
        with pytest.raises(DatasetError, match=f"is in {re.escape(str(dataset_root))}: set dataset.root={re.escape(str(dataset_root))}\\)"):
            load(root, **options(tmp_path))
    # a folder beside an unrelated train/ is not pointed at its parent
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "mine").mkdir()
    with pytest.raises(DatasetError) as error:
        load_cars196(tmp_path / "data" / "mine", **options(tmp_path))
    assert "set dataset.root=" not in str(error.value)


def test_listed_images_missing_on_disk(cars_mat_root, tmp_path):
    root = tmp_path / "cars"
    root.mkdir()
    (root / "cars_annos.mat").write_bytes((cars_mat_root / "cars_annos.mat").read_bytes())
    with pytest.raises(DatasetError, match=r"294 of the 294 images listed in cars_annos.mat are missing .*car_ims/000001.jpg.*incomplete"):
        load_cars196(root, **options(tmp_path))
    assert not list((tmp_path / "cache").glob("*.h5")), "no cache from a failed build"


def test_damaged_annotation_line(cub_root, tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    for name in ("images.txt", "image_class_labels.txt", "classes.txt"):
        (root / name).write_text((cub_root / "CUB_200_2011" / name).read_text())
    with (root / "image_class_labels.txt").open("a") as f:
        f.write("401\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt, line 401, has 1 fields"):
        load_cub200(root, **options(tmp_path))


@pytest.mark.parametrize("mode", ["L", "I;16", "I;16 dark", "P", "RGBA", "CMYK"])
def test_images_of_other_modes_decode_to_the_rgb_they_show(tmp_path, mode):
    """Grey JPEGs (CUB and Cars have some), 16-bit grey PNGs (a dark one too, all below 256 in 16
    bits: black, not mid-grey), palette, RGBA and CMYK files."""
    from PIL import Image

    from aomd.data.images import decode

    grey = np.tile(np.linspace(0, 255, 32), (32, 1)).round().astype(np.uint8)
    if mode == "I;16 dark":  # 0..127 of 65535: black
        image = Image.fromarray((grey // 2).astype(np.uint16))
        assert image.mode == "I;16"
        image.save(tmp_path / "dark.png")
        assert decode(tmp_path / "dark.png", 32).max() == 0
        return
    rgb = np.stack([grey, grey[::-1], np.full_like(grey, 90)], axis=-1)
    image = {"L": lambda: Image.fromarray(grey, "L"),
             "I;16": lambda: Image.fromarray(grey.astype(np.uint16) * 257),
             "P": lambda: Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE),
             "RGBA": lambda: Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA"),
             "CMYK": lambda: Image.fromarray(rgb).convert("CMYK")}[mode]()
    assert image.mode == mode
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path, quality=100) if mode == "CMYK" else image.save(path)
    expected = np.repeat(grey[..., None], 3, axis=-1) if mode in ("L", "I;16") else rgb
    error = np.abs(decode(path, 32).astype(int) - expected).mean()
    assert error < (6 if mode in ("P", "CMYK") else 0.5), error  # a palette and JPEG are lossy


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_image_stops_the_build_or_is_skipped(tmp_path, caplog, damage):
    root = make_folder(tmp_path, classes=4, per_class=3)
    bad = root / "class_03" / "img1.jpg"
    if damage == "corrupt":
        bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 4)
    else:
        write_jpeg(bad, 7, size=(64, 48))
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    before = snapshot(root)
    with pytest.raises(BadImageError) as error:
        load_folder(root, **options(tmp_path))
    assert str(bad) in str(error.value) and "dataset.skip_bad_images=true" in str(error.value)
    assert not list((tmp_path / "cache").glob("*.h5"))
    caplog.set_level(logging.WARNING)
    data = load_folder(root, **options(tmp_path, skip_bad_images=True))
    assert f"Skipping unreadable image {bad}" in caplog.text
    assert len(data.test) == 5 and str(bad) not in data.test.paths
    assert np.bincount(data.test.labels).tolist()[2:] == [3, 2]
    # a run that does not allow skipping stops on a cache that left the file out
    with pytest.raises(BadImageError, match="left out"):
        load_folder(root, **options(tmp_path))
    caplog.clear()
    load_folder(root, **options(tmp_path, skip_bad_images=True))
    assert "1 unreadable images were left out" in caplog.text
    assert snapshot(root) == before


def test_a_failed_build_is_not_decoded_again_until_its_bad_files_read(tmp_path, monkeypatch):
    """A sweep's next jobs fail at once with the first one's error (each decoding SOP again to fail
    the same way took hours); once a bad file reads (replaced, its permissions fixed, a network
    error gone), the next build decodes the dataset, and a build skipping bad images forgets it."""
    root = make_folder(tmp_path, classes=4, per_class=3)
    bad = root / "class_03" / "img1.jpg"
    bad.write_bytes(b"not a JPEG")
    with pytest.raises(BadImageError) as error:
        load_folder(root, **options(tmp_path))
    (marker,) = (tmp_path / "cache").glob("folder-*.h5.failed")
    decoded = []
    real_decode = packing.decode_all
    monkeypatch.setattr(packing, "decode_all", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    with pytest.raises(BadImageError) as again:
        load_folder(root, **options(tmp_path))
    assert str(again.value) == f"{error.value} (found by an earlier build of this cache: those files still cannot be " \
                               "read, so the dataset was not decoded again)"
    assert not decoded
    load_folder(root, **options(tmp_path, skip_bad_images=True))
    assert decoded and not marker.exists()
    # the same with the file repaired
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(BadImageError):
        load_folder(root, **options(tmp_path))
    assert marker.exists()
    write_jpeg(bad, 7, size=(64, 48))
    data = load_folder(root, **options(tmp_path))
    assert str(bad) in data.test.paths and not marker.exists()


def test_parallel_build_names_every_bad_image_of_both_splits(tmp_path, caplog):
    root = make_folder(tmp_path, classes=8, per_class=10)
    bad = ["class_01/img3.jpg", "class_05/img3.jpg", "class_05/img7.jpg", "class_07/img0.jpg"]
    for name in bad:
        (root / name).write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="Cannot read 4 images: .*class_01/img3.jpg .*class_05/img3.jpg "
                                            ".*class_05/img7.jpg .* and 1 more, each logged above"):
        load_folder(root, **options(tmp_path, decode_workers=2))
    assert all(f"Cannot read image {root / name} (" in caplog.text for name in bad)
    assert not list((tmp_path / "cache").glob("*.h5"))


# --- the entrypoints ----------------------------------------------------------------------------

def run_module(module: str, *overrides: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_prepare_reports_a_missing_annotation_file_in_one_line(cub_root, tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    (root / "images.txt").write_text((cub_root / "CUB_200_2011" / "images.txt").read_text())
    result = run_module("aomd.prepare", "dataset=cub200", f"dataset.root={root}", "logger=none",
                        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("aomd.prepare: error: cub200: image_class_labels.txt is missing")


TRAIN_SHORT = ["train.epochs=1", "train.iters_per_epoch=2", "train.batch_size=16", "train.images_per_class=2",
               f"dataset.base_size={BASE}", f"dataset.image_size={CROP}", "backbone.pretrained=false",
               "logger=none", "train.progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, make, extra", [
    ("cub200", make_cub, []),
    ("cars196", make_cars_mat, []),
    ("cars196", make_cars_folders, []),
    ("sop", make_sop, ["eval.recall_k=[1,10]"]),
    ("folder", make_folder, ["eval.recall_k=[1,2]", "train.batch_size=8"]),
], ids=["cub200", "cars196-mat", "cars196-folders", "sop", "folder"])
def test_short_training_run(tmp_path, dataset, make, extra):
    root = make(tmp_path / "data")
    before = snapshot(root)
    result = run_module("aomd.train", f"dataset={dataset}", f"dataset.root={root}", *TRAIN_SHORT, *extra,
                        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert len(list((tmp_path / "cache").glob(f"{dataset}-*.h5"))) == 1
    assert snapshot(root) == before
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "finished" and [r["epoch"] for r in record["history"]] == [0, 1]
    cars = lambda classes: sum(cars_images_per_class(c) for c in classes)
    expected = {"cub200": (200, 200, 100, 100), "cars196": (cars(range(1, 99)), cars(range(99, 197)), 98, 98),
                "sop": (18, 18, 6, 6), "folder": (9, 9, 3, 3)}[dataset]  # the split of docs/datasets.md
    counts = record["dataset"]
    assert (counts["train_images"], counts["test_images"], counts["train_classes"], counts["test_classes"]) == expected


@pytest.mark.slow
def test_prepare_builds_and_verifies_the_cache(tmp_path):
    root = make_sop(tmp_path / "data")
    (tmp_path / "data" / "Stanford_Online_Products.zip").write_bytes(b"not the original archive")
    result = run_module("aomd.prepare", "dataset=sop", f"dataset.root={root}", "eval.recall_k=[1,10]",
                        f"dataset.base_size={BASE}", f"dataset.image_size={CROP}", "logger=none",
                        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "Stanford_Online_Products.zip" in out and "MISMATCH" in out
    assert "train 6 classes / 18 images" in out and "verified" in out
    assert len(list((tmp_path / "cache").glob("sop-*.h5"))) == 1


def test_prepare_accepts_a_folder_dataset_with_a_class_in_train_and_test(tmp_path, caplog, capsys):
    """Training warns and goes on where train/ and test/ name one class; aomd.prepare does the same."""
    from aomd.config import compose
    from aomd.prepare import prepare

    root = tmp_path / "explicit"
    for split, names in (("train", ["a", "b"]), ("test", ["a", "c", "d"])):
        for name in names:
            for k in range(3):
                write_jpeg(root / split / name / f"{k}.png", ord(name) + k)
    caplog.set_level(logging.INFO)
    prepare(compose(["dataset=folder", f"dataset.root={root}", f"dataset.base_size={BASE}", f"dataset.image_size={CROP}",
                     f"paths.cache_dir={tmp_path / 'cache'}", "eval.recall_k=[1,2]", "train.progress=false",
                     "logger=none"]))
    assert "1 classes are in both train/ and test/" in caplog.text
    assert "folder is ready:\n  train 2 classes / 6 images, test 3 classes / 9 images" in capsys.readouterr().out


def test_a_teacher_in_a_folder_this_user_may_only_read_is_used_and_one_to_train_there_is_refused(tmp_path, monkeypatch):
    """A group's shared teachers' folder, read-only for this user: its finished teacher is used
    without taking the lock; a teacher that would have to be trained there is one line."""
    import errno

    from aomd import teachers
    from aomd.runtime import Runtime
    from conftest import compose

    root = make_folder(tmp_path, classes=6)
    cfg = compose("dataset=folder", f"dataset.root={root}", f"paths.teachers_dir={tmp_path / 'teachers'}")
    data = load_folder(root, train_fraction=0.5, **options(tmp_path))

    def read_only_mount(path, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(teachers, "FileLock", read_only_mount)
    with pytest.raises(ConfigError, match=f"^Cannot train the teacher in {tmp_path / 'teachers'} .Read-only file system.; "
                                          "point paths.teachers_dir to a folder this user can write, or pass "
                                          r"teacher.checkpoint=<path>\.$"):
        teachers.teacher_checkpoint(cfg, data, Runtime.resolve("cpu"))
    finished = teachers.default_teacher_dir(cfg, data.files_digest)
    (finished / "checkpoints").mkdir(parents=True, exist_ok=True)
    (finished / "checkpoints" / "best.pt").write_bytes(b"")
    (finished / "metrics.json").write_text('{"status": "finished"}')
    assert teachers.teacher_checkpoint(cfg, data, Runtime.resolve("cpu")) == finished / "checkpoints" / "best.pt"
