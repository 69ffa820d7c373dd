"""The packed HDF5 cache: every dataset decoded and resized once, then read from one file.

Layout of a cache file::

    /<split>/images   uint8 [N, S, S, 3]   (split = train | test)
    /<split>/labels   int64 [N]
    /<split>/paths    utf-8 strings [N]    (optional: the original files)
    /skipped/paths    utf-8 strings [K]    (optional: files left out as unreadable)
    /skipped/reasons  utf-8 strings [K]
    attrs: format_version, key (JSON of what the cache was built from), complete (set last)

A split is written either at once from memory (`write_split`) or streamed chunk by chunk
(`SplitWriter`), so datasets larger than memory (SOP at 256 px is about 23 GB) are packed
without holding them.

A file is used only when its `format_version` and `key` match and `complete` is set; anything
else (an older format, another root or size, a build that was interrupted) is rebuilt. Builds
write to a temporary file under a file lock and are renamed into place when complete, so
concurrent jobs build a cache once and never read a half-written one. A build killed outright
(no chance to clean up) leaves its temporary file behind; the next build removes it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np
from filelock import FileLock, Timeout

from aomd.data.errors import DatasetError
from aomd.data.splits import ImageSplit, RetrievalData
from aomd.errors import cannot_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# split name -> (images uint8 [N, S, S, 3], labels int64 [N], original paths or None)
PackedSplits = Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str] | None]]


def cache_file(cache_dir: str | Path, name: str, key: Mapping) -> Path:
    """Path of the cache file for dataset `name` built from `key` (root, size, format, ...) in
    this code's `FORMAT_VERSION`: two versions of the code never build the same file (the
    files of format 1 keep the names they had before the version was part of them)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    version = "" if FORMAT_VERSION == 1 else f"-v{FORMAT_VERSION}"
    return Path(cache_dir).expanduser() / f"{name}{version}-{digest}.h5"


def is_complete(path: Path, key: Mapping) -> bool:
    """True when `path` is a finished cache built from `key` in the current format."""
    try:
        if not path.exists():  # raises PermissionError (Python 3.11) where the cache folder cannot be entered
            return False
        with h5py.File(path, "r") as h5:
            return (
                bool(h5.attrs.get("complete", False))
                and int(h5.attrs.get("format_version", -1)) == FORMAT_VERSION
                and json.loads(h5.attrs.get("key", "null")) == json.loads(json.dumps(key))
            )
    except PermissionError as error:
        raise DatasetError(f"Cannot read the dataset cache {path} ({error.strerror}); give this user read access "
                           f"to it, or point paths.cache_dir (or AOMD_CACHE_DIR) to a folder of your own.") from error
    except OSError as error:
        if "unable to lock file" in str(error).lower():  # HDF5's own file locking, which some network file systems lack
            raise DatasetError(f"HDF5 cannot lock the dataset cache {path} on this file system ({error}); "
                               f"set HDF5_USE_FILE_LOCKING=FALSE in the job's environment.") from error
        return False  # truncated, or not an HDF5 file at all


def write_split(
    h5: h5py.File,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str] | None = None,
) -> None:
    """Write one split held in memory into an open cache file."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
    group = h5.create_group(split)
    group.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
    _write_annotations(group, labels, paths)


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    # a path that is not UTF-8 on disk is a str with surrogates (os.fsdecode): stored as its bytes
    encoded = [value.encode(errors="surrogateescape") for value in values]
    group.create_dataset(name, data=np.asarray(encoded, dtype=object), dtype=h5py.string_dtype())


def _write_annotations(group: h5py.Group, labels: np.ndarray, paths: Sequence[str] | None) -> None:
    group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    if paths is not None:
        _write_strings(group, "paths", paths)


class SplitWriter:
    """Streams one split into an open cache file: `append` images chunk by chunk as they are
    decoded, then `finish` with the labels and paths of exactly the images appended.

    `capacity` is the number of images expected; fewer may be appended (unreadable files left
    out), and the images dataset is shrunk to what was written. HDF5 allocates chunks only when
    written, so the reserved capacity costs no disk space.
    """

    def __init__(self, h5: h5py.File, split: str, capacity: int, size: int):
        self.group = h5.create_group(split)
        shape = (size, size, 3)
        self.images = self.group.create_dataset(
            "images", shape=(capacity, *shape), maxshape=(None, *shape), dtype=np.uint8, chunks=(1, *shape)
        )
        self.count = 0

    def append(self, images: np.ndarray) -> None:
        """Add uint8 [k, S, S, 3] images after those already written."""
        assert images.dtype == np.uint8 and images.shape[1:] == self.images.shape[1:]
        end = self.count + len(images)
        if end > self.images.shape[0]:
            self.images.resize(end, axis=0)
        if len(images):
            self.images[self.count : end] = images
        self.count = end

    def finish(self, labels: np.ndarray, paths: Sequence[str] | None = None) -> None:
        """Write labels int64 [count] (and paths) of the appended images; trims unused capacity."""
        assert len(labels) == self.count and (paths is None or len(paths) == self.count), "one label per image"
        self.images.resize(self.count, axis=0)
        _write_annotations(self.group, labels, paths)


def write_skipped(h5: h5py.File, skipped: Iterable[tuple[str, str]]) -> None:
    """Record the files left out as unreadable, each (path, reason), so later runs can report them."""
    skipped = list(skipped)
    if skipped:
        group = h5.create_group("skipped")
        _write_strings(group, "paths", [path for path, _ in skipped])
        _write_strings(group, "reasons", [reason for _, reason in skipped])


def read_skipped(path: Path) -> list[tuple[str, str]]:
    """The (path, reason) of every file a complete cache left out as unreadable."""
    with h5py.File(path, "r") as h5:
        if "skipped" not in h5:
            return []
        group = h5["skipped"]
        return list(zip(_decode_strings(group["paths"][...]), _decode_strings(group["reasons"][...])))


def _decode_strings(values: Iterable) -> list[str]:
    return [v.decode(errors="surrogateescape") if isinstance(v, bytes) else v for v in values]


def build_cache(path: Path, key: Mapping, fill: Callable[[h5py.File], None]) -> None:
    """Build the cache at `path`: `fill` writes the splits into a temporary file, renamed when done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["key"] = json.dumps(key, sort_keys=True)
            fill(h5)
            h5.attrs["complete"] = True
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_cache(path: Path, key: Mapping, fill: Callable[[h5py.File], None]) -> Path:
    """Return `path` once it holds a complete cache for `key`, building it (once, under a lock) if not.

    A complete cache is read without the lock, so a cache prepared ahead in a folder this user may
    only read (a group's shared `paths.cache_dir`) serves every job."""
    if is_complete(path, key):  # renamed into place complete: no build of this key replaces it
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", mode=0o666)  # a lock file the group's other users can take too
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Waiting for another job to finish building the dataset cache %s.", path)
            lock.acquire()
        try:
            # holding the lock, no other build is running: a temporary file left now is from a build
            # that was killed, and may be gigabytes
            for leftover in path.parent.glob(f"{path.name}.tmp-*"):
                log.warning("Removing %s, left by an interrupted cache build.", leftover)
                leftover.unlink(missing_ok=True)
            if not is_complete(path, key):
                if path.exists():
                    log.warning("Cache %s is stale or incomplete; rebuilding it.", path)
                else:
                    log.info("Building the dataset cache %s (once).", path)
                    _mention_other_caches(path)
                build_cache(path, key, fill)
        finally:
            lock.release()
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a quota: disk_usage showed room before the build
            raise DatasetError(f"The dataset cache {path.name} did not fit in {path.parent} ({error.strerror or 'no space'}); "
                               f"free space or quota there, or point paths.cache_dir (or AOMD_CACHE_DIR) to a folder "
                               f"with room for it.") from error
        if not (cannot_write(error) and _within(error.filename, path.parent)):
            raise  # not the cache's: a dataset file this user may not read is the dataset's error (aomd.build)
        raise DatasetError(f"Cannot build the dataset cache in {path.parent} ({error.strerror}); point "
                           f"paths.cache_dir (or AOMD_CACHE_DIR) to a folder this user can write.") from error
    return path


def _within(filename: str | bytes | None, folder: Path) -> bool:
    """Whether an OSError's `filename` is `folder`, in it, or a folder on its path (None: a file
    of h5py's, which writes only the cache)."""
    if filename is None:
        return True
    failed = Path(os.fsdecode(filename)).absolute()
    folder = folder.absolute()
    return failed == folder or folder in failed.parents or failed in folder.parents


def other_caches(path: Path) -> list[Path]:
    """The cache files beside `path` of the same dataset option (`folder`'s: any root), built with
    other settings (another size or root) or by another format version."""
    name = _cache_name(path)
    pattern = re.compile(rf"{re.escape(name)}(-v\d+)?-[0-9a-f]{{12}}\.h5")
    return sorted(p for p in path.parent.glob(f"{name}-*.h5") if p != path and pattern.fullmatch(p.name))


def _cache_name(path: Path) -> str:
    """The dataset name a cache file is named by (`cache_file`)."""
    return re.fullmatch(r"(.+?)(-v\d+)?-[0-9a-f]{12}\.h5", path.name).group(1)


def _mention_other_caches(path: Path) -> None:
    """Caches are never removed by a job (another job or code version may still read them), so
    building one says which older ones of the dataset take space beside it."""
    others = other_caches(path)
    if others:
        sizes = ", ".join(f"{p.name} ({p.stat().st_size / 1e9:.1f} GB)" for p in others)
        log.info("Other caches named %s in %s (other settings, roots or aomd versions): %s; delete those no job "
                 "reads any more.", _cache_name(path), path.parent, sizes)


class H5Images:
    """On-demand reader of `/<split>/images` in a cache file; opens the file once per process
    (so DataLoader workers each get their own handle).

    Indexing by an integer array returns uint8 [len(index), S, S, 3]. It reads each run of
    consecutive indices as one slice: h5py's own fancy indexing builds a point selection that is
    hundreds of times slower for a random batch (0.4 s against about 1 ms for 32 images of 256 px).
    """

    def __init__(self, path: Path, split: str):
        self.path, self.split = Path(path), split
        with h5py.File(self.path, "r") as h5:
            self.shape = h5[split]["images"].shape
        self._file, self._dataset, self._pid = None, None, None

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        """Close this process's handle (a handle inherited through fork is the parent's to close)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._dataset, self._pid = None, None, None

    def __del__(self):
        self.close()

    def __getitem__(self, index):
        if self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._dataset = self._file[self.split]["images"]
            self._pid = os.getpid()
        if isinstance(index, (list, np.ndarray)):
            index = np.asarray(index)
            if index.ndim == 1 and index.dtype.kind in "iu":
                return self._read_many(index)
        return self._dataset[index]

    def _read_many(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), *self.shape[1:]), dtype=self._dataset.dtype)
        if len(index) == 0:
            return out
        index = np.where(index < 0, index + self.shape[0], index)
        if index.min() < 0 or index.max() >= self.shape[0]:
            raise IndexError(f"index out of range for {self.shape[0]} images")
        # run r covers out[firsts[r]:lasts[r]], read from the file at index[firsts[r]] onwards
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        firsts = np.concatenate([[0], breaks])
        lasts = np.concatenate([breaks, [len(index)]])
        for first, last in zip(firsts.tolist(), lasts.tolist()):
            start = int(index[first])
            self._dataset.read_direct(out, np.s_[start : start + last - first], np.s_[first:last])
        return out

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "shape": self.shape, "_file": None, "_dataset": None, "_pid": None}


def read_split(path: Path, split: str, in_memory: bool) -> ImageSplit:
    """One split of a complete cache file, its images loaded into memory or read on demand."""
    with h5py.File(path, "r") as h5:
        group = h5[split]
        labels = group["labels"][...]
        paths = _decode_strings(group["paths"][...]) if "paths" in group else None
        images = group["images"][...] if in_memory else None
    return ImageSplit(images if in_memory else H5Images(path, split), labels, paths)


def open_packed(
    name: str,
    key: Mapping,
    build: Callable[[], PackedSplits],
    *,
    cache_dir: str | Path,
    image_size: int,
    in_memory: bool,
) -> RetrievalData:
    """Read dataset `name` from its cache, building it from `build()` (in memory) on first use."""

    def fill(h5: h5py.File) -> None:
        for split, (images, labels, paths) in build().items():
            write_split(h5, split, images, labels, paths)

    path = ensure_cache(cache_file(cache_dir, name, key), key, fill)
    train, test = (read_split(path, split, in_memory) for split in ("train", "test"))
    return RetrievalData(name, train, test, base_size=train.images.shape[1], image_size=image_size)
