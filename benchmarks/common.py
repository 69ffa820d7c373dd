"""What the benchmarks share: a packed dataset of the benchmarks' shapes, timing, composed configs."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aomd.config import compose, config_dir, validate
from aomd.data.cache import open_packed
from aomd.data.splits import RetrievalData

# Cars196's class-disjoint split (docs/datasets.md): the shapes the reference recipe runs on
CARS196_SPLIT = {"train_images": 8054, "test_images": 8131, "train_classes": 98, "test_classes": 98}


def noise_dataset(cache_dir: str | Path, train_images: int, test_images: int, classes_per_split: int,
                  base_size: int = 256, image_size: int = 224, in_memory: bool = False) -> RetrievalData:
    """A packed HDF5 cache of random uint8 images of `base_size` px in the layout of the real
    benchmarks' caches (the loader and the network do the same work whatever the pixels are).
    Built once per `cache_dir` and shape."""
    key = {"format": "benchmark-noise-v1", "train": train_images, "test": test_images,
           "classes": classes_per_split, "base_size": base_size}

    def build():
        rng = np.random.default_rng(0)
        splits = {}
        for split, count, first_class in (("train", train_images, 0), ("test", test_images, classes_per_split)):
            images = rng.integers(0, 256, (count, base_size, base_size, 3), dtype=np.uint8)
            labels = first_class + np.arange(count, dtype=np.int64) % classes_per_split
            splits[split] = (images, labels, None)
        return splits

    return open_packed("noise", key, build, cache_dir=cache_dir, image_size=image_size, in_memory=in_memory)


def loss_config(option: str, *overrides: str):
    """The validated job config of `python -m aomd.train loss=<option> <overrides>`."""
    return validate(compose([f"loss={option}", "logger=none", *overrides]))


def loss_options() -> list[str]:
    return sorted(path.stem for path in (Path(config_dir()) / "loss").glob("*.yaml"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(function: Callable[[], object], device: torch.device, calls: int, warmup: int) -> float:
    """Mean wall time of `function` over `calls` calls after `warmup` untimed ones, device work included."""
    for _ in range(warmup):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / calls


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    import os
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, PyTorch {torch.__version__}"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
