"""The three metric-learning benchmarks, read from the layouts users have (docs/datasets.md).

- `cub200`: CUB-200-2011, `CUB_200_2011/` with `images.txt`, `image_class_labels.txt`,
  `classes.txt` and `images/<NNN.Class_Name>/*.jpg`. Train: classes 1-100, test: 101-200.
- `cars196`: Cars196, either `cars_annos.mat` + `car_ims/*.jpg` (the reference layout), or the
  class-folder layout of the Kaggle mirrors, `train/<class name>/*.jpg` and `test/<class name>/*.jpg`
  (the official classification split, merged here). Train: classes 1-98, test: 99-196.
- `sop`: Stanford Online Products, `Ebay_train.txt` / `Ebay_test.txt` (header, then
  `image_id class_id super_class_id path`) and `<super_class>_final/*.JPG`; the two files are the
  class-disjoint split (11,318 / 11,316 classes).

`dataset.root` may be the dataset folder itself or the folder holding it (`CUB_200_2011/`,
`Stanford_Online_Products/`). Labels are the class ids minus one, so they are unique across
splits. Each loader lists the files, then `aomd.data.packing` builds or reads the cache.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from aomd.data.cars196_classes import CARS196_CLASSES
from aomd.data.errors import DatasetError
from aomd.data.layout import (DatasetListing, Expected, SplitFiles, class_folders, layout_error, read_table,
                              require_classes, split_by_class, to_int)
from aomd.data.packing import open_listing
from aomd.data.splits import RetrievalData

log = logging.getLogger(__name__)

# docs/datasets.md: the published class-disjoint splits
EXPECTED = {
    "cub200": Expected(images=11_788, train_classes=100, train_images=5_864, test_classes=100, test_images=5_924),
    "cars196": Expected(images=16_185, train_classes=98, train_images=8_054, test_classes=98, test_images=8_131),
    "sop": Expected(images=120_053, train_classes=11_318, train_images=59_551, test_classes=11_316, test_images=60_502),
}

# md5 of the original release archives, verified by `python -m aomd.prepare` when they are found
ARCHIVES = {
    "cub200": {"CUB_200_2011.tgz": "97eceeb196236b17998738112f37df78"},
    "cars196": {"car_ims.tgz": "d5c8f0aa497503f355e17dc7886c3f14", "cars_annos.mat": "b407c6086d669747186bd1d764ff9dbc"},
    "sop": {"Stanford_Online_Products.zip": "7f73d41a2f44250d4779881525aea32e"},
}

OBTAIN = {
    "cub200": "download CUB_200_2011.tgz (md5 97eceeb196236b17998738112f37df78) from the Caltech data repository "
              "(data.caltech.edu, 'Caltech-UCSD Birds-200-2011'), extract it and set dataset.root to the "
              "extracted CUB_200_2011 folder",
    "cars196": "the original host is gone: get Cars196 from a Kaggle mirror (e.g. kaggle.com/datasets/cyizhuo/"
               "stanford-cars-by-classes-folder, with train/ and test/ class folders, or a mirror of car_ims.tgz "
               "and cars_annos.mat) and set dataset.root to the folder holding train/ and test/ or cars_annos.mat",
    "sop": "the original host is gone: get Stanford_Online_Products.zip (md5 7f73d41a2f44250d4779881525aea32e) "
           "from a mirror, extract it and set dataset.root to the extracted Stanford_Online_Products folder",
}

LAYOUT = {
    "cub200": "CUB_200_2011/ holding images.txt, image_class_labels.txt, classes.txt and "
              "images/<NNN.Class_Name>/*.jpg",
    "cars196": "cars_annos.mat with car_ims/*.jpg, or train/<class name>/*.jpg with test/<class name>/*.jpg",
    "sop": "Stanford_Online_Products/ holding Ebay_train.txt, Ebay_test.txt and <super_class>_final/*.JPG",
}


def _resolve_root(name: str, root: str | Path | None) -> Path:
    if root is None or not str(root).strip():
        raise DatasetError(f"{name}: dataset.root is not set; set it to the folder holding {LAYOUT[name]}.")
    return Path(root).expanduser().resolve()


def _dataset_root(name: str, root: str | Path | None, marker: str, folder: str) -> Path:
    """The folder holding `marker`: `root` itself or its subfolder `folder` (the extracted archive)."""
    root = _resolve_root(name, root)
    for candidate in (root, root / folder):
        if (candidate / marker).is_file():
            return candidate
    raise layout_error(name, root, f"no {marker} in dataset.root", LAYOUT[name], OBTAIN[name], [marker])


def _listing(name: str, root: Path, train: SplitFiles, test: SplitFiles, source: str, rule: str) -> DatasetListing:
    listing = DatasetListing(name, root, train, test, source, OBTAIN[name], EXPECTED[name])
    require_classes(listing, rule)
    return listing


# --- CUB-200-2011 ------------------------------------------------------------------------------

def list_cub200(root: str | Path) -> DatasetListing:
    """Files and labels of CUB-200-2011 under `root`; train = classes 1-100, test = 101-200."""
    name, obtain = "cub200", OBTAIN["cub200"]
    root = _dataset_root(name, root, "images.txt", "CUB_200_2011")
    tables = {}
    for file, columns in (("images.txt", 2), ("image_class_labels.txt", 2), ("classes.txt", 2)):
        if not (root / file).is_file():
            raise layout_error(name, root, f"{file} is missing", LAYOUT[name], obtain)
        tables[file] = read_table(root / file, columns, obtain=obtain)
    class_of = {row[0]: to_int(row[1], root / "image_class_labels.txt", "class id", obtain)
                for row in tables["image_class_labels.txt"]}
    known = {to_int(row[0], root / "classes.txt", "class id", obtain) for row in tables["classes.txt"]}
    files, labels = [], []
    for image_id, relative in tables["images.txt"]:
        if image_id not in class_of:
            raise DatasetError(f"{name}: image {image_id} ({relative}) of images.txt has no class in "
                               f"image_class_labels.txt, so the annotation files do not belong together; {obtain}.")
        if class_of[image_id] not in known:
            raise DatasetError(f"{name}: class {class_of[image_id]} of image {image_id} is not in classes.txt, "
                               f"so the annotation files do not belong together; {obtain}.")
        files.append(root / "images" / relative)
        labels.append(class_of[image_id] - 1)
    train, test = split_by_class(files, labels, lambda label: label < 100)
    return _listing(name, root, train, test, "images.txt", "train: classes 1-100, test: 101-200")


# --- Cars196 -----------------------------------------------------------------------------------

def _normalised(class_name: str) -> str:
    # folder names cannot hold "/" ("Ram C/V Cargo Van" is "Ram C-V Cargo Van" on disk) and some
    # mirrors change case or punctuation: compare letters and digits only
    return " ".join(re.findall(r"[0-9a-z]+", class_name.lower()))


_CARS196_IDS = {_normalised(n): i + 1 for i, n in enumerate(CARS196_CLASSES)}


def _cars196_class_id(folder_name: str) -> int | None:
    """The original class id (1-196) of a class folder: its class name, after a number or not
    (the name decides: some mirrors number the classes alphabetically), or a number alone (001,
    1); None for a name that is no Cars196 class, numbered or not."""
    number = re.match(r"^(\d{1,3})(?:$|[._ -])(.*)", folder_name)
    name = number.group(2) if number else folder_name
    if _normalised(name) in _CARS196_IDS:
        return _CARS196_IDS[_normalised(name)]
    if number and not name.strip() and 1 <= int(number.group(1)) <= 196:
        return int(number.group(1))
    return None


def _cars196_from_mat(root: Path) -> tuple[list[Path], list[int]]:
    """Files and class ids (1-196) from cars_annos.mat (`annotations` struct array, 1 x N)."""
    from scipy.io import loadmat  # scipy is slow to import; only this layout needs it

    path, obtain = root / "cars_annos.mat", OBTAIN["cars196"]
    try:
        mat = loadmat(path, squeeze_me=True)
        annotations = np.atleast_1d(mat["annotations"])
        relative, classes = annotations["relative_im_path"], annotations["class"]
    except Exception as error:  # noqa: BLE001 - loadmat raises many types on a damaged or other file
        raise DatasetError(f"cars196: cannot read {path} as the Cars196 annotations (a MATLAB v5 file whose "
                           f"`annotations` have fields relative_im_path and class): {type(error).__name__}: "
                           f"{error}; {obtain}.") from None
    files = [root / str(r) for r in relative]
    return files, [to_int(_mat_number_text(c), path, "class id", obtain) for c in classes]


def _mat_number_text(value) -> str:
    """A number read from a .mat file, as text: "7" for 7 and for 7.0 (the original file stores
    class ids as uint8; one re-saved by MATLAB or Octave may store them as doubles)."""
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _cars196_from_folders(root: Path) -> tuple[list[Path], list[int]]:
    """Files and class ids (1-196) from train/<class name>/ and test/<class name>/ (merged);
    every one of the 196 classes must have a folder, or the published split would silently lose it."""
    files, labels, unknown = [], [], []
    for split in ("train", "test"):
        folder_of: dict[int, str] = {}
        for folder_name, class_files in class_folders(root / split, nested=True):
            class_id = _cars196_class_id(folder_name)
            if class_id is None:
                unknown.append(f"{split}/{folder_name}")
                continue
            if class_id in folder_of:
                raise DatasetError(f"cars196: {split}/{folder_of[class_id]} and {split}/{folder_name} in {root} are both "
                                   f"class {class_id} ({CARS196_CLASSES[class_id - 1]!r}); keep one folder per class.")
            folder_of[class_id] = folder_name
            files += class_files
            labels += [class_id] * len(class_files)
    if unknown:
        raise DatasetError(
            f"cars196: {len(unknown)} class folders of {root} are not Cars196 class names (first: {unknown[0]!r}), "
            f"so their original class ids and the published split are unknown; name each folder after its class "
            f"(e.g. 'AM General Hummer SUV 2000') or its class id (1-196), as the Kaggle class-folder mirrors do.")
    missing = sorted(set(range(1, 197)) - set(labels))
    if missing:
        first = missing[0]
        raise DatasetError(
            f"cars196: {len(missing)} of the 196 classes have no image folder in {root}/train or {root}/test "
            f"(first: class {first}, {CARS196_CLASSES[first - 1]!r}), so the split would lack them; check that the "
            f"download was extracted whole, or {OBTAIN['cars196']}.")
    return files, labels


def list_cars196(root: str | Path) -> DatasetListing:
    """Files and labels of Cars196 under `root`, from cars_annos.mat or class folders;
    train = classes 1-98, test = 99-196 (the official train and test images merged)."""
    name = "cars196"
    root = _resolve_root(name, root)
    if (root / "cars_annos.mat").is_file():
        (files, class_ids), source = _cars196_from_mat(root), "cars_annos.mat"
    elif (root / "train").is_dir() and (root / "test").is_dir():
        (files, class_ids), source = _cars196_from_folders(root), "class folders"
    else:
        raise layout_error(name, root, "neither cars_annos.mat nor train/ and test/ class folders in dataset.root",
                           LAYOUT[name], OBTAIN[name], ["cars_annos.mat", "train"])
    bad = sorted({c for c in class_ids if not 1 <= c <= 196})
    if bad:
        raise DatasetError(f"cars196: {source} in {root} has class id {bad[0]}, outside 1-196; {OBTAIN[name]}.")
    train, test = split_by_class(files, np.asarray(class_ids) - 1, lambda label: label < 98)
    return _listing(name, root, train, test, source, "train: classes 1-98, test: 99-196")


# --- Stanford Online Products ------------------------------------------------------------------

def list_sop(root: str | Path) -> DatasetListing:
    """Files and labels of Stanford Online Products under `root`: Ebay_train.txt is the train
    split and Ebay_test.txt the test split (class-disjoint; checked)."""
    name, obtain = "sop", OBTAIN["sop"]
    root = _dataset_root(name, root, "Ebay_train.txt", "Stanford_Online_Products")
    splits = {}
    for split in ("train", "test"):
        file = root / f"Ebay_{split}.txt"
        if not file.is_file():
            raise layout_error(name, root, f"Ebay_{split}.txt is missing", LAYOUT[name], obtain)
        rows = read_table(file, 4, header=True, obtain=obtain)
        splits[split] = SplitFiles([root / row[3] for row in rows],
                                   [to_int(row[1], file, "class id", obtain) - 1 for row in rows])
    shared = np.intersect1d(splits["train"].labels, splits["test"].labels)
    if len(shared):
        raise DatasetError(f"sop: Ebay_train.txt and Ebay_test.txt in {root} share {len(shared)} classes (first: "
                           f"{shared[0] + 1}), so they are not the class-disjoint benchmark split; {obtain}.")
    return _listing(name, root, splits["train"], splits["test"], "Ebay_train.txt and Ebay_test.txt",
                    "Ebay_train.txt and Ebay_test.txt")


# --- loaders (the `_target_` of conf/dataset/<name>.yaml) ---------------------------------------

def load_cub200(root: str, base_size: int = 256, image_size: int = 224, cache_dir: str = "~/.cache/aomd",
                in_memory: bool = False, skip_bad_images: bool = False, decode_workers: int | None = None,
                progress: bool = True) -> RetrievalData:
    """CUB-200-2011 from `root`, packed at `base_size` on first use (see the module docstring)."""
    return open_listing(list_cub200(root), base_size=base_size, image_size=image_size, cache_dir=cache_dir,
                        in_memory=in_memory, skip_bad_images=skip_bad_images, decode_workers=decode_workers,
                        progress=progress)


def load_cars196(root: str, base_size: int = 256, image_size: int = 224, cache_dir: str = "~/.cache/aomd",
                 in_memory: bool = False, skip_bad_images: bool = False, decode_workers: int | None = None,
                 progress: bool = True) -> RetrievalData:
    """Cars196 from `root` (.mat or class-folder layout), packed at `base_size` on first use."""
    return open_listing(list_cars196(root), base_size=base_size, image_size=image_size, cache_dir=cache_dir,
                        in_memory=in_memory, skip_bad_images=skip_bad_images, decode_workers=decode_workers,
                        progress=progress)


def load_sop(root: str, base_size: int = 256, image_size: int = 224, cache_dir: str = "~/.cache/aomd",
             in_memory: bool = False, skip_bad_images: bool = False, decode_workers: int | None = None,
             progress: bool = True) -> RetrievalData:
    """Stanford Online Products from `root`, packed at `base_size` on first use (about 23 GB at 256 px)."""
    return open_listing(list_sop(root), base_size=base_size, image_size=image_size, cache_dir=cache_dir,
                        in_memory=in_memory, skip_bad_images=skip_bad_images, decode_workers=decode_workers,
                        progress=progress)
