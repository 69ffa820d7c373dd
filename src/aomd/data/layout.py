"""What the loaders share before any image is decoded: the listing of a dataset's files and
labels, class-disjoint splitting, the published counts, reading annotation files, and the
messages for a missing or incomplete dataset.

A loader turns `dataset.root` into a `DatasetListing` (files and labels of the train and test
splits); `aomd.data.packing` turns a listing into the packed cache and a `RetrievalData`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from aomd.data.errors import DatasetError
from aomd.data.images import IMAGE_EXTENSIONS, is_image_file

log = logging.getLogger(__name__)


@dataclass
class SplitFiles:
    """One split before decoding: `files[i]` (absolute) has class `labels[i]` (int64 [N])."""

    files: list[Path]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        assert len(self.files) == len(self.labels), "one label per file"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))


@dataclass(frozen=True)
class Expected:
    """The published counts of a benchmark (docs/datasets.md), checked when the full dataset is present."""

    images: int
    train_classes: int
    train_images: int
    test_classes: int
    test_images: int


@dataclass
class DatasetListing:
    """Every file of a dataset with its label and split; what the cache is built from.

    root: the folder the layout was found in (absolute; the files lie under it).
    source: what the files were listed from, for messages ("images.txt", "class folders", ...).
    obtain: where the data can be obtained, one phrase for messages.
    expected: the published counts, or None for datasets without any.
    """

    name: str
    root: Path
    train: SplitFiles
    test: SplitFiles
    source: str
    obtain: str
    expected: Expected | None = None

    def splits(self) -> dict[str, SplitFiles]:
        return {"train": self.train, "test": self.test}

    def digest(self) -> str:
        """Fingerprint of every (split, file, label): part of the cache key, so a cache is rebuilt
        when the files or their labels change (images added, another split rule, ...). File names
        that are not UTF-8 (a zip extracted without its UTF-8 flag) count as their bytes."""
        sha = hashlib.sha1()
        for split, files in self.splits().items():
            for path, label in zip(files.files, files.labels.tolist()):
                sha.update(f"{split}\t{path.relative_to(self.root).as_posix()}\t{label}\n".encode(errors="surrogateescape"))
        return sha.hexdigest()


def split_by_class(files: Sequence[Path], labels: Sequence[int], is_train: Callable[[int], bool]) -> tuple[SplitFiles, SplitFiles]:
    """Class-disjoint train and test splits: a file goes to train when `is_train(its label)`."""
    labels = np.asarray(labels, dtype=np.int64)
    train = np.array([is_train(int(c)) for c in labels], dtype=bool)

    def pick(keep: np.ndarray) -> SplitFiles:
        return SplitFiles([f for f, k in zip(files, keep) if k], labels[keep])

    return pick(train), pick(~train)


def check_counts(listing: DatasetListing) -> None:
    """Log the split counts; on a full benchmark, compare them with the published ones.

    A full image count whose splits differ means the annotations (or the class folders) are not
    the original ones, so results would not be comparable with published numbers: a warning.
    """
    train, test = listing.train, listing.test
    counts = (f"train {train.num_classes} classes / {len(train)} images, "
              f"test {test.num_classes} classes / {len(test)} images")
    expected = listing.expected
    total = len(train) + len(test)
    if expected is None:
        log.info("%s (%s in %s): %s.", listing.name, listing.source, listing.root, counts)
    elif total != expected.images:
        log.info("%s: %d of the %d images of the full dataset are listed (%s); the published split counts "
                 "are checked on the full dataset only.", listing.name, total, expected.images, counts)
    elif (train.num_classes, len(train), test.num_classes, len(test)) == (
            expected.train_classes, expected.train_images, expected.test_classes, expected.test_images):
        log.info("%s: %s, as published.", listing.name, counts)
    else:
        log.warning("%s: the full %d images are present but the splits differ from the published ones "
                    "(found %s; published train %d classes / %d images, test %d classes / %d images), so results "
                    "will not be comparable with published numbers; check the annotation files in %s.",
                    listing.name, total, counts, expected.train_classes, expected.train_images,
                    expected.test_classes, expected.test_images, listing.root)


def require_classes(listing: DatasetListing, rule: str) -> None:
    """Both splits must hold images, or there is nothing to train or evaluate on."""
    for split, files in listing.splits().items():
        if len(files) == 0:
            raise DatasetError(f"{listing.name}: no images of the {split} classes ({rule}) were found in "
                               f"{listing.root} ({listing.source}); {listing.obtain}.")


# --- what is on disk ---------------------------------------------------------------------------

def describe(folder: Path, limit: int = 6) -> str:
    """What is at `folder`, in a few words, for "found ..." in messages."""
    if not folder.exists():
        return "nothing (the folder does not exist)"
    if not folder.is_dir():
        return "a file, not a folder"
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as error:
        return f"a folder that cannot be listed ({error.strerror})"
    entries = [e for e in entries if not e.name.startswith(".")]
    if not entries:
        return "an empty folder"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(names) + more


def find_below(root: Path, marker: str | Callable[[Path], bool], depth: int = 3, max_folders: int = 500) -> Path | None:
    """The first folder within `depth` levels under `root` that holds the file or folder `marker`
    (or for which `marker(folder)` is true), breadth-first, at most `max_folders` folders looked
    at, so a wrong root such as $HOME stays cheap."""
    found = marker if callable(marker) else lambda folder: (folder / marker).exists()
    if not root.is_dir():
        return None
    queue, seen = deque([(root, 0)]), 0
    while queue and seen < max_folders:
        folder, level = queue.popleft()
        seen += 1
        if level > 0 and found(folder):
            return folder
        if level < depth:
            try:
                subfolders = sorted(e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
            except OSError:
                continue
            queue.extend((Path(p), level + 1) for p in subfolders)
    return None


def layout_error(name: str, root: Path, problem: str, layout: str, obtain: str, markers: Iterable[str] = ()) -> DatasetError:
    """The one-sentence error for a dataset that is not where or how it should be: what is wrong,
    the expected layout, what was found, a better root when one is found just above (a root set to
    one of the dataset's own folders) or below, where to get it."""
    hint = ""
    for marker in markers:
        # the folder above, when root is one of the dataset's own folders: beside a marker file
        # (CUB's images/ beside images.txt), or the marker folder itself (Cars196's train/); any
        # folder beside an unrelated train/ is not
        above = (root.parent / marker).is_file() or root == root.parent / marker
        better = root.parent if above else find_below(root, marker)
        if better is not None:
            hint = f" ({marker} is in {better}: set dataset.root={better})"
            break
    return DatasetError(f"{name}: {problem}; expected {layout}, found in {root}: {describe(root)}{hint}; {obtain}.")


def holds_class_folders(folder: Path, at_least: int = 2) -> bool:
    """Whether `folder` has `at_least` subfolders with an image file in them (looked at cheaply,
    for a hint: no listing of whole folders, no warnings)."""
    count = 0
    try:
        for entry in os.scandir(folder):
            if entry.is_dir() and not entry.name.startswith("."):
                with os.scandir(entry.path) as inside:
                    count += any(e.is_file() and is_image_file(e.name) for e in inside)
                if count >= at_least:
                    return True
    except OSError:
        pass
    return False


def class_folders(folder: Path, nested: bool = False) -> list[tuple[str, list[Path]]]:
    """(class name, image files) of each subfolder of `folder` holding images, sorted by name;
    files sorted by name. Hidden entries are ignored. With `nested`, a subfolder `X` holding no
    images but subfolders `Y` that do gives the classes "X/Y" (a class name with a "/", such as
    Cars196's "Ram C/V Cargo Van Minivan 2012", extracted as two folders)."""
    classes, other_files = [], Counter()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files, others = _image_files(entry.path)
            if files:
                classes.append((entry.name, files))
                other_files += others
            elif nested and (inner := [(f"{entry.name}/{name}", files) for name, files in class_folders(Path(entry.path))]):
                classes += inner
            else:
                log.warning("Ignoring %s: it holds no image files.", entry.path)
    if other_files:  # e.g. .heic or .avif photos, which would silently shrink their classes
        kinds = ", ".join(f"{extension or '(none)'}: {count}" for extension, count in other_files.most_common())
        log.warning("Ignoring %d files of other kinds than %s in the class folders of %s (%s); convert those that "
                    "are images.", sum(other_files.values()), "/".join(sorted(IMAGE_EXTENSIONS)), folder, kinds)
    return classes


def _image_files(folder: str) -> tuple[list[Path], Counter]:
    """The image files in `folder` (sorted), and how many other files it holds per extension."""
    images, others = [], Counter()
    for entry in os.scandir(folder):
        if entry.is_file() and not entry.name.startswith("."):
            if is_image_file(entry.name):
                images.append(Path(entry.path))
            else:
                others[os.path.splitext(entry.name)[1].lower()] += 1
    return sorted(images), others


def read_table(path: Path, columns: int, *, header: bool = False, obtain: str) -> list[list[str]]:
    """The rows of a whitespace-separated annotation file, each `columns` fields (the last one
    takes the rest of the line, so paths may hold spaces); a damaged line is a DatasetError.
    With `header`, the first line is skipped unless it starts with a number (a copy without it)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first field
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"Cannot read {path} ({error}); {obtain}.") from None
    first_field = lines[0].split()[:1] if lines else []
    if header and first_field and first_field[0].isdigit():
        header = False  # a copy without its header line (a number where a column name is) loses no image
    rows = []
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise DatasetError(f"{path}, line {number}, has {len(fields)} fields where {columns} are expected "
                               f"({line.strip()[:60]!r}); the file is damaged: {obtain}.")
        rows.append(fields)
    return rows


def to_int(value: str, path: Path, what: str, obtain: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{path} has {value!r} where a {what} (an integer) is expected; the file is damaged: {obtain}.") from None
