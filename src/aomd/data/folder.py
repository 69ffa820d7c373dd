"""`dataset=folder`: any image collection laid out one folder per class.

Layouts (image files: .jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, any case)::

    root/<class>/*.jpg                       split class-disjoint by sorted class name: the first
                                             round(train_fraction x classes) are train, the rest test
    root/train/<class>/*.jpg                 explicit splits, used as they are
    root/test/<class>/*.jpg

Labels are class indices in sorted name order (train classes first with explicit splits); a class
name found under both train/ and test/ is the same class, which makes the evaluation no longer
zero-shot (warned).
"""
from __future__ import annotations

import logging
from pathlib import Path

from aomd.data.errors import DatasetError
from aomd.data.layout import (DatasetListing, SplitFiles, class_folders, describe, find_below, holds_class_folders,
                              layout_error, require_classes)
from aomd.data.images import is_image_file
from aomd.data.packing import open_listing
from aomd.data.splits import RetrievalData
from aomd.errors import ConfigError

log = logging.getLogger(__name__)

LAYOUT = "<class>/<image files> (one folder per class), or train/<class>/... and test/<class>/..."
OBTAIN = "put one folder of images per class under dataset.root"


def _split_files(classes: list[tuple[str, list[Path]]], label_of: dict[str, int]) -> SplitFiles:
    files = [f for _, class_files in classes for f in class_files]
    labels = [label_of[name] for name, class_files in classes for _ in class_files]
    return SplitFiles(files, labels)


def list_folder(root: str | Path | None, train_fraction: float = 0.5) -> DatasetListing:
    """Files and labels of a class-per-folder collection under `root` (see the module docstring)."""
    if root is None or not str(root).strip():
        raise DatasetError(f"folder: dataset.root is not set; set it to the folder holding {LAYOUT}.")
    if not 0 < train_fraction < 1:
        raise ConfigError(f"dataset.train_fraction must be between 0 and 1 (both excluded), got {train_fraction}.")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise layout_error("folder", root, "dataset.root is not a folder", LAYOUT, OBTAIN)

    if (root / "train").is_dir() and (root / "test").is_dir():
        train_classes, test_classes = class_folders(root / "train"), class_folders(root / "test")
        train_names = [name for name, _ in train_classes]
        shared = sorted(set(train_names) & {name for name, _ in test_classes})
        if shared:
            log.warning("folder: %d classes are in both train/ and test/ of %s (first: %s); they are the same "
                        "class in both, so the test classes are not unseen.", len(shared), root, shared[0])
        names = train_names + sorted({name for name, _ in test_classes} - set(train_names))
        source, rule = "train/ and test/ class folders", "the train/ and test/ folders"
    else:
        classes = class_folders(root)
        if len(classes) < 2:
            raise _too_few_classes(root, len(classes))
        # at least one class on each side, whatever the fraction
        n_train = min(max(round(train_fraction * len(classes)), 1), len(classes) - 1)
        train_classes, test_classes = classes[:n_train], classes[n_train:]
        names = [name for name, _ in classes]
        source = "class folders"
        rule = f"the first {n_train} of {len(classes)} classes by name, dataset.train_fraction={train_fraction}"
        log.info("folder: train classes %s .. %s, test classes %s .. %s (%s).", names[0], names[n_train - 1],
                 names[n_train], names[-1], rule)
    label_of = {name: label for label, name in enumerate(names)}
    listing = DatasetListing("folder", root, _split_files(train_classes, label_of), _split_files(test_classes, label_of),
                             source, OBTAIN)
    require_classes(listing, rule)
    return listing


def _too_few_classes(root: Path, classes: int) -> DatasetError:
    """The error for a dataset.root without two class folders, with a better root where one is near:
    the parent, when dataset.root is one class's folder, or a folder a few levels below."""
    loose = sum(1 for p in root.iterdir() if p.is_file() and is_image_file(p.name))
    problem = (f"holds {loose} image{'s' * (loose != 1)} directly, not in class folders" if loose
               else f"holds {classes} class folder{'s' * (classes != 1)} with images, where at least 2 are needed")
    better = root.parent if loose and holds_class_folders(root.parent) else find_below(root, holds_class_folders)
    hint = f" (class folders are in {better}: set dataset.root={better})" if better else ""
    if (root / "train").is_dir() and not (root / "test").is_dir():  # e.g. train/ and val/
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "train" and holds_class_folders(p))
        hint = (f" (train/ has no test/ beside it: rename {others[0]}/ to test/ to test on its classes, or set "
                f"dataset.root={root / 'train'} to split train/'s classes)" if others else
                f" (train/ has no test/ beside it: add the test classes' folders in test/, or set "
                f"dataset.root={root / 'train'} to split train/'s classes)")
    return DatasetError(f"folder: {root} {problem}; expected {LAYOUT}, found: {describe(root)}{hint}; {OBTAIN}.")


def load_folder(root: str, train_fraction: float = 0.5, base_size: int = 256, image_size: int = 224,
                cache_dir: str = "~/.cache/aomd", in_memory: bool = False, skip_bad_images: bool = False,
                decode_workers: int | None = None, progress: bool = True) -> RetrievalData:
    """A class-per-folder collection from `root`, packed at `base_size` on first use."""
    return open_listing(list_folder(root, train_fraction), base_size=base_size, image_size=image_size,
                        cache_dir=cache_dir, in_memory=in_memory, skip_bad_images=skip_bad_images,
                        decode_workers=decode_workers, progress=progress)
