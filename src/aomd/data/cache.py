"""The packed HDF5 cache: every dataset decoded and resized once, then read from one file.

Layout of a cache file::

    /<split>/images   uint8 [N, S, S, 3]   (split = train | test)
    /<split>/labels   int64 [N]
    /<split>/paths    utf-8 strings [N]    (optional: the original files)
    attrs: format_version, key (JSON of what the cache was built from), complete (set last)

A file is used only when its `format_version` and `key` match and `complete` is set; anything
else (an older format, another root or size, a build that was interrupted) is rebuilt. Builds
write to a temporary file under a file lock and are renamed into place when complete, so
concurrent jobs build a cache once and never read a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import h5py
import numpy as np
from filelock import FileLock

from aomd.data.splits import ImageSplit, RetrievalData

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# split name -> (images uint8 [N, S, S, 3], labels int64 [N], original paths or None)
PackedSplits = Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str] | None]]


def cache_file(cache_dir: str | Path, name: str, key: Mapping) -> Path:
    """Path of the cache file for dataset `name` built from `key` (root, size, format, ...)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{name}-{digest}.h5"


def is_complete(path: Path, key: Mapping) -> bool:
    """True when `path` is a finished cache built from `key` in the current format."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return (
                bool(h5.attrs.get("complete", False))
                and int(h5.attrs.get("format_version", -1)) == FORMAT_VERSION
                and json.loads(h5.attrs.get("key", "null")) == json.loads(json.dumps(key))
            )
    except OSError:  # truncated or not an HDF5 file at all
        return False


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
    group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    if paths is not None:
        group.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())


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
    """Return `path` once it holds a complete cache for `key`, building it (once, under a lock) if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not is_complete(path, key):
            if path.exists():
                log.warning("Cache %s is stale or incomplete; rebuilding it.", path)
            else:
                log.info("Building the dataset cache %s (once).", path)
            build_cache(path, key, fill)
    return path


class H5Images:
    """On-demand reader of `/<split>/images` in a cache file; opens the file once per process
    (so DataLoader workers each get their own handle)."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = Path(path), split
        with h5py.File(self.path, "r") as h5:
            self.shape = h5[split]["images"].shape
        self._dataset, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if self._pid != os.getpid():
            self._dataset = h5py.File(self.path, "r")[self.split]["images"]
            self._pid = os.getpid()
        return self._dataset[index]

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "shape": self.shape, "_dataset": None, "_pid": None}


def read_split(path: Path, split: str, in_memory: bool) -> ImageSplit:
    """One split of a complete cache file, its images loaded into memory or read on demand."""
    with h5py.File(path, "r") as h5:
        group = h5[split]
        labels = group["labels"][...]
        paths = [p.decode() if isinstance(p, bytes) else p for p in group["paths"][...]] if "paths" in group else None
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
