"""Decoding image files: one file, many files in parallel (to pack the cache), or on demand.

Every image is decoded with PIL, converted to RGB and resized to `size` x `size` with bilinear
filtering (antialiased when shrinking, as torchvision's `Resize` on PIL images does): the
"resize to 256x256" of docs/methods.md, section 1, done once per image instead of once per epoch.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from aomd.preemption import ignore_in_worker
from aomd.progress import progress_bar
from aomd.runtime import usable_cpus

# what counts as an image file in class folders (compared lower-case: SOP's files end in .JPG)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode(path: str | Path | Image.Image, size: int) -> np.ndarray:
    """The image at `path` (or a PIL image) as uint8 [size, size, 3]; raises (OSError, ValueError,
    ...) on a bad file."""
    if isinstance(path, Image.Image):
        rgb = _to_rgb(path)
    else:
        with Image.open(path) as image:
            # convert() forces the full decode, so a truncated file raises here rather than later
            rgb = _to_rgb(image)
    return np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit grey (PNG, mode I;16) is scaled to 8 bits: PIL's
    convert("RGB") clips it at 255, which leaves it almost white. Mode I (32-bit integers, as
    some PIL versions open 16-bit PNGs) is scaled the same when it holds values above 255. (No
    benchmark has such images, so the cache's DECODE_FORMAT did not change with this: a
    `dataset=folder` cache built from 16-bit images before is rebuilt by deleting it.)"""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image.convert("I"), dtype=np.int64)
        if image.mode != "I" or grey.max(initial=0) > 255:
            grey = np.rint(grey / 257)
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def _decode_chunk(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker task: the readable images of `paths` stacked as uint8 [k, size, size, 3], in order,
    and (position in `paths`, reason) of each file that could not be decoded."""
    images, failures = [], []
    for position, path in enumerate(paths):
        try:
            images.append(decode(path, size))
        except Exception as error:  # noqa: BLE001 - PIL raises many types on bad files; all mean "unreadable"
            failures.append((position, f"{type(error).__name__}: {error}"))
    stacked = np.stack(images) if images else np.empty((0, size, size, 3), dtype=np.uint8)
    return stacked, failures


def unreadable_files(paths: Sequence[str], size: int) -> list[tuple[int, str]]:
    """(position in `paths`, reason) of each file that cannot be decoded, in this process."""
    return _decode_chunk(paths, size)[1]


@dataclass
class DecodedChunk:
    """Consecutive files `start .. start + count - 1` of a decode_all() list, decoded.

    images: uint8 [count - len(failed), S, S, 3], the readable files in list order.
    failed: (index in the whole list, reason) of the files that could not be decoded.
    """

    start: int
    count: int
    images: np.ndarray
    failed: list[tuple[int, str]]


def worker_context() -> multiprocessing.context.BaseContext:
    """How the data's worker processes start (the decode pool's, the loaders'): by fork on Linux,
    whatever Python's default there (forkserver from Python 3.14). A fork starts in milliseconds
    and shares the parent's memory, images held in memory included; forkserver and spawn would
    pickle those into every worker and re-import the entrypoint (torch, Hydra) in each. Elsewhere
    the platform's default (spawn on macOS, where fork is unsafe)."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)


def decode_all(
    paths: Sequence[str | Path],
    size: int,
    *,
    workers: int | None = None,
    chunk_size: int = 32,
    progress: bool = False,
    desc: str = "decode",
) -> Iterator[DecodedChunk]:
    """Decode `paths` to `size` x `size`, yielding DecodedChunks in list order.

    The files are spread over `workers` processes (None: all cores; 0 or 1: this process),
    `chunk_size` files per task. At most two tasks per worker are in flight, so memory stays
    bounded however long the list (the caller writes each chunk away before the next).
    Bad files do not stop the decoding; the caller decides what a failure means.
    """
    paths = [str(p) for p in paths]
    workers = usable_cpus() if workers is None else workers  # decode processes
    starts = iter(range(0, len(paths), chunk_size))
    with progress_bar(enabled=progress, total=len(paths), desc=desc, unit="img") as bar:
        if workers <= 1 or len(paths) <= chunk_size:
            for start in starts:
                chunk = paths[start : start + chunk_size]
                yield _chunk(start, len(chunk), *_decode_chunk(chunk, size))
                bar.update(len(chunk))
            return
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=_start_decode_worker,
                                   initargs=(os.getpid(),))
        pending: deque[tuple[int, int, Future]] = deque()

        def submit(start: int) -> None:
            chunk = paths[start : start + chunk_size]
            pending.append((start, len(chunk), pool.submit(_decode_chunk, chunk, size)))

        try:
            for start in islice(starts, 2 * workers):
                submit(start)
            while pending:
                start, count, future = pending.popleft()
                images, failures = future.result()
                for following in islice(starts, 1):  # keep the pool busy while the caller writes
                    submit(following)
                bar.update(count)
                yield _chunk(start, count, images, failures)
        finally:
            # on an error or a closed generator, do not run the queued tasks
            pool.shutdown(wait=True, cancel_futures=True)


def _start_decode_worker(parent: int) -> None:
    """A decode worker ignores the stop signals, which are the job's (forked with submitit's
    handler, it would requeue the job and write its checkpoint too, racing the job's own), and
    so ends with its parent instead: killed when the parent dies (Linux), or at once if it already
    has. Otherwise a job killed by its process group's SIGTERM would leave its workers waiting for
    tasks for good, and a `... | tee` of its output would never end."""
    ignore_in_worker()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _chunk(start: int, count: int, images: np.ndarray, failures: list[tuple[int, str]]) -> DecodedChunk:
    return DecodedChunk(start, count, images, [(start + i, reason) for i, reason in failures])


class DecodedImages:
    """The images of `paths` decoded from their files on every access, as uint8 [len(index), S, S, 3].

    This is the path the cache replaces (the reference decodes and resizes every image every
    epoch); it has the interface of the cache reader (`len`, numpy-style indexing by an index
    array), so it can stand in an ImageSplit, e.g. to measure what the cache gains.
    """

    def __init__(self, paths: Sequence[str | Path], size: int):
        self.paths = [str(p) for p in paths]
        self.size = size
        self.shape = (len(self.paths), size, size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if np.ndim(index) == 0:
            return decode(self.paths[int(index)], self.size)
        return np.stack([decode(self.paths[int(i)], self.size) for i in np.asarray(index).ravel()])
