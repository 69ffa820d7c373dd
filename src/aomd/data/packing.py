"""From a dataset listing to a `RetrievalData` read from the packed HDF5 cache.

On first use the listed files are decoded once (in parallel processes), resized to `base_size`
and streamed into the cache file chunk by chunk, so a dataset larger than memory is never held
at once; later runs read only the cache. The cache key covers the dataset, its root, the base
size, the decoding recipe and a fingerprint of the listed files and labels: any change builds a
new cache, and an interrupted build is never used (see `aomd.data.cache`).

Nothing under the dataset root is written: the cache lives under `cache_dir`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import closing, suppress
from pathlib import Path

import h5py
import numpy as np

from aomd.data.cache import SplitWriter, cache_file, ensure_cache, read_skipped, read_split, write_skipped
from aomd.data.errors import BadImageError, DatasetError
from aomd.data.images import decode_all, unreadable_files
from aomd.data.layout import DatasetListing, SplitFiles, check_counts
from aomd.data.splits import RetrievalData
from aomd.errors import ConfigError
from aomd.records import write_json_atomic

log = logging.getLogger(__name__)

# the decoding recipe (aomd.data.images.decode); change it when decoding changes, so caches rebuild
DECODE_FORMAT = "pil-rgb-bilinear-v1"
# the cache must not take the last of the disk: this much is kept free
DISK_MARGIN = 1.05


def open_listing(
    listing: DatasetListing,
    *,
    base_size: int,
    image_size: int,
    cache_dir: str | Path,
    in_memory: bool,
    skip_bad_images: bool,
    decode_workers: int | None,
    progress: bool,
) -> RetrievalData:
    """The dataset of `listing`, read from its cache (built first if needed).

    Images are uint8 [N, base_size, base_size, 3], loaded into memory when `in_memory`, read on
    demand otherwise. Unreadable images stop the build with a BadImageError (each one logged), or,
    with `skip_bad_images`, are left out with a warning (and reported on every later run).
    """
    _check_options(base_size=base_size, image_size=image_size, in_memory=in_memory,
                   skip_bad_images=skip_bad_images, decode_workers=decode_workers)
    check_counts(listing)
    key = {
        "format": DECODE_FORMAT,
        "dataset": listing.name,
        "root": str(listing.root),
        "base_size": base_size,
        "files": listing.digest(),
    }

    path = cache_file(cache_dir, listing.name, key)
    failure = FailedBuild(path)

    def fill(h5: h5py.File) -> None:
        if not skip_bad_images:  # a sweep's every job would otherwise decode the whole dataset to fail the same way
            failure.raise_if_still_unreadable(base_size)
        splits = _located_files(listing)
        _check_disk_space(listing, base_size, Path(cache_dir).expanduser())
        unreadable = []
        for split, files in splits.items():
            unreadable += _pack_split(h5, split, files, listing, base_size, skip_bad_images, decode_workers, progress,
                                      write=skip_bad_images or not unreadable)
        if unreadable and not skip_bad_images:
            message = _unreadable_message(unreadable, listing.obtain)
            failure.record(message, [file for file, _ in unreadable])
            raise BadImageError(message)
        write_skipped(h5, unreadable)

    path = ensure_cache(path, key, fill)
    failure.forget()
    log.info("%s: reading the cache %s", listing.name, path)
    _report_skipped(path, listing, skip_bad_images)
    train, test = (read_split(path, split, in_memory) for split in ("train", "test"))
    for split, data in (("train", train), ("test", test)):
        if len(data) == 0:
            raise DatasetError(f"{listing.name}: no readable images are left in the {split} split; "
                               f"replace the unreadable files in {listing.root} and delete {path}.")
    return RetrievalData(listing.name, train, test, base_size=base_size, image_size=image_size, files_digest=key["files"])


def _check_options(base_size, image_size, in_memory, skip_bad_images, decode_workers) -> None:
    """The loader options are typed only here (dataset groups have no schema): a wrong value is a
    ConfigError naming the key, before any work."""
    def require(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise ConfigError(f"dataset.{key} must be {what}, got {value!r}.")

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    require(is_int(base_size) and base_size >= 1, "base_size", "a positive number of pixels", base_size)
    require(is_int(image_size) and 1 <= image_size <= base_size, "image_size",
            f"a number of pixels no larger than dataset.base_size ({base_size})", image_size)
    require(isinstance(in_memory, bool), "in_memory", "true or false", in_memory)
    require(isinstance(skip_bad_images, bool), "skip_bad_images", "true or false", skip_bad_images)
    require(decode_workers is None or (is_int(decode_workers) and decode_workers >= 0), "decode_workers",
            "null (all cores) or a number of processes, 0 or more", decode_workers)


def _pack_split(h5: h5py.File, split: str, files: SplitFiles, listing: DatasetListing, base_size: int,
                skip_bad_images: bool, decode_workers: int | None, progress: bool, write: bool) -> list[tuple[str, str]]:
    """Decode one split into the cache file; the (path, reason) of the files left out as unreadable.

    Without `skip_bad_images` an unreadable file fails the build, but every file is still decoded
    (each failure logged), so that one error covers all of them: a rebuild per bad file would
    decode SOP again each time. From the first failure on (or with `write` false, after one in an
    earlier split) nothing more is written to the cache file, which the failed build discards."""
    writer = SplitWriter(h5, split, len(files), base_size)
    keep = np.ones(len(files), dtype=bool)
    unreadable = []
    chunks = decode_all(files.files, base_size, workers=decode_workers, progress=progress,
                        desc=f"packing {listing.name} {split}")
    with closing(chunks):  # closing stops the worker processes at once on an error
        for chunk in chunks:
            for index, reason in chunk.failed:
                path = str(files.files[index])
                log.warning("Skipping unreadable image %s (%s)." if skip_bad_images else "Cannot read image %s (%s).",
                            path, reason)
                keep[index] = False
                unreadable.append((path, reason))
            write = write and (skip_bad_images or not unreadable)
            if write:
                writer.append(chunk.images)
    if write:
        writer.finish(files.labels[keep], [str(p) for p, k in zip(files.files, keep) if k])
    return unreadable


class FailedBuild:
    """`<cache>.failed`: the unreadable images that failed the last build of a cache. The next
    build (a sweep's next job, or one that waited at the lock) decodes those files first: when they
    still fail, it fails at once with the same error instead of decoding the whole dataset again
    (hours for SOP); when one of them reads now (replaced, its permissions fixed, a network error
    gone), it forgets the failure and builds."""

    def __init__(self, cache_path: Path):
        self.path = cache_path.with_name(cache_path.name + ".failed")

    def record(self, message: str, files: list[str]) -> None:
        with suppress(OSError):  # a folder this user may only read: the next job decodes again
            write_json_atomic(self.path, {"message": message, "files": files})

    def raise_if_still_unreadable(self, base_size: int) -> None:
        try:
            state = json.loads(self.path.read_text())
            message, files = str(state["message"]), [str(file) for file in state["files"]]
        except (OSError, ValueError, KeyError, TypeError):
            return  # none, or damaged: build
        if files and len(unreadable_files(files, base_size)) == len(files):
            raise BadImageError(f"{message} (found by an earlier build of this cache: those files still cannot be read, "
                                f"so the dataset was not decoded again)")
        self.forget()

    def forget(self) -> None:
        with suppress(OSError):
            self.path.unlink(missing_ok=True)


def _unreadable_message(unreadable: list[tuple[str, str]], obtain: str, shown: int = 3) -> str:
    first = "; ".join(f"{path} ({reason})" for path, reason in unreadable[:shown])
    more = f" and {len(unreadable) - shown} more, each logged above" if len(unreadable) > shown else ""
    return (f"Cannot read {len(unreadable)} image{'s' * (len(unreadable) > 1)}: {first}{more}; replace "
            f"{'them' if len(unreadable) > 1 else 'it'} ({obtain}) or set dataset.skip_bad_images=true to leave "
            f"unreadable images out.")


def _located_files(listing: DatasetListing) -> dict[str, SplitFiles]:
    """The listing's splits with every file found on disk, before hours of decoding start. A file
    whose extension differs only in case (a mirror's .jpg for the .JPG that Ebay_*.txt lists)
    stands in for it; the listing itself, whose names key the cache, is left as it is."""
    located, missing, renamed = {}, [], 0
    for split, files in listing.splits().items():
        paths = []
        for path in files.files:
            if not path.is_file():
                variant = next((v for v in (path.with_suffix(path.suffix.lower()), path.with_suffix(path.suffix.upper()))
                                if v != path and v.is_file()), None)
                if variant is None:
                    missing.append(path)
                else:
                    path, renamed = variant, renamed + 1
            paths.append(path)
        located[split] = SplitFiles(paths, files.labels)
    if renamed:
        log.info("%s: %d files listed in %s end in another case on disk (e.g. .jpg for .JPG); reading those.",
                 listing.name, renamed, listing.source)
    if missing:
        total = len(listing.train) + len(listing.test)
        first = missing[0].relative_to(listing.root)
        raise DatasetError(
            f"{listing.name}: {len(missing)} of the {total} images listed in {listing.source} are missing under "
            f"{listing.root} (first: {first}), so the dataset is incomplete; {listing.obtain}.")
    return located


def _check_disk_space(listing: DatasetListing, base_size: int, cache_dir: Path) -> None:
    needed = (len(listing.train) + len(listing.test)) * base_size * base_size * 3
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_dir).free
    if free < needed * DISK_MARGIN:
        raise DatasetError(
            f"The {listing.name} cache needs about {needed / 1e9:.1f} GB but {cache_dir} has {free / 1e9:.1f} GB free; "
            f"free some space or point paths.cache_dir (or AOMD_CACHE_DIR) to a larger disk.")


def _report_skipped(path: Path, listing: DatasetListing, skip_bad_images: bool) -> None:
    """Unreadable files left out when the cache was built are reported on every run; a run that
    does not allow skipping stops, as it would have had the cache been built by it."""
    skipped = read_skipped(path)
    if not skipped:
        return
    first, reason = skipped[0]
    if not skip_bad_images:
        raise BadImageError(
            f"Cannot read image {first} ({reason}), which the cache {path} left out"
            f"{f' with {len(skipped) - 1} other unreadable images' if len(skipped) > 1 else ''}; replace the "
            f"file and delete the cache to rebuild it, or set dataset.skip_bad_images=true.")
    log.warning("%s: %d unreadable images were left out of the cache (first: %s, %s); replace them and delete "
                "%s to include them.", listing.name, len(skipped), os.path.relpath(first, listing.root), reason, path)
