"""Build and verify a dataset's packed cache ahead of a sweep:
`python -m aomd.prepare dataset=cub200 dataset.root=/data/CUB_200_2011`.

Takes the same configuration as `aomd.train` (so the cache it builds is the one training jobs
with the same `dataset.*` and `paths.cache_dir` will read). It
1. checks the md5 of the original release archives found in `dataset.root` or the folder above
   it (a mismatch is a warning: mirrors repackage archives, and the cache is built from the
   extracted files, whose counts are checked against the published ones),
2. builds the cache if it is missing or stale (decoding every image once),
3. reads every cached image back, checks the splits are class-disjoint and that the test split
   is large enough for `eval.recall_k`, and prints the counts and the cache file.
Nothing under `dataset.root` is written.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from aomd.build import build_dataset
from aomd.cli import run_task, start
from aomd.config import check_test_size, config_dir, validate
from aomd.data.benchmarks import ARCHIVES
from aomd.data.cache import H5Images
from aomd.data.errors import DatasetError
from aomd.data.splits import ImageSplit, RetrievalData
from aomd.progress import progress_bar

log = logging.getLogger(__name__)

READ_CHUNK = 256  # images read back at once when verifying


def md5sum(path: Path, progress: bool) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f, progress_bar(enabled=progress, total=path.stat().st_size, unit="B", unit_scale=True,
                                            desc=f"md5 {path.name}", leave=False) as bar:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_archives(name: str, root: Path | None, progress: bool) -> list[str]:
    """Lines saying, for each original archive of dataset `name` found in `root` or its parent,
    whether its md5 is the published one."""
    expected = ARCHIVES.get(name, {})
    if not expected or root is None:
        return []
    folders = [root, root.parent]
    lines = []
    for archive, md5 in expected.items():
        found = next((folder / archive for folder in folders if (folder / archive).is_file()), None)
        if found is None:
            continue
        actual = md5sum(found, progress)
        if actual == md5:
            lines.append(f"  {found}: md5 OK")
        else:
            lines.append(f"  {found}: md5 MISMATCH ({actual}, the original release has {md5})")
            log.warning("%s differs from the original release (md5 %s, expected %s); if the counts below are not "
                        "the published ones, download it again.", found, actual, md5)
    if not lines:
        lines.append(f"  none of {', '.join(expected)} found in {' or '.join(map(str, folders))} (not checked)")
    return lines


def verify_split(split_name: str, split: ImageSplit, progress: bool) -> None:
    """Read every image of a cached split back, so a damaged cache file fails here, not mid-sweep."""
    n = len(split)
    for first in progress_bar(range(0, n, READ_CHUNK), enabled=progress, desc=f"verifying {split_name}", leave=False):
        images = np.asarray(split.images[first : min(first + READ_CHUNK, n)])
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetError(f"The cached {split_name} images have dtype {images.dtype} and shape {images.shape} "
                               f"instead of uint8 [N, S, S, 3]; delete the cache file and run aomd.prepare again.")


def prepare(cfg: DictConfig) -> None:
    cfg = validate(cfg)
    progress = bool(cfg.train.progress)
    root = cfg.dataset.get("root")
    root = Path(root).expanduser().resolve() if root else None

    # the on-demand reader, whatever dataset.in_memory says: verifying streams the file
    data: RetrievalData = build_dataset(cfg.dataset, in_memory=False)
    shared = set(np.unique(data.train.labels).tolist()) & set(np.unique(data.test.labels).tolist())
    # a folder dataset's train/ and test/ may name one class in both (its listing warned); the
    # benchmarks' splits are class-disjoint by definition, so there shared classes mean a bad cache
    if shared and data.name != "folder":
        raise DatasetError(f"The {data.name} train and test splits share classes; delete the cache file and "
                           f"run aomd.prepare again.")
    check_test_size(cfg.eval.recall_k, len(data.test))
    for split_name in ("train", "test"):
        verify_split(split_name, getattr(data, split_name), progress)

    lines = [f"{data.name} is ready:"]
    s = data.summary()
    lines.append(f"  train {s['train_classes']} classes / {s['train_images']} images, "
                 f"test {s['test_classes']} classes / {s['test_images']} images, "
                 f"{data.base_size} px, every image read back and verified")
    if isinstance(data.train.images, H5Images):
        path = data.train.images.path
        lines.append(f"  cache: {path} ({path.stat().st_size / 1e9:.2f} GB)")
    lines += check_archives(data.name, root, progress)
    print("\n".join(lines), flush=True)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(prepare, cfg, "aomd.prepare")


if __name__ == "__main__":
    start(sys.argv[1:], "train", "aomd.prepare")
    main()
