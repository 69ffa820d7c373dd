"""What the benchmarks share: a packed dataset of the benchmarks' shapes, timing, composed configs."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

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


def batch_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """Labels of a recipe batch (5 images per class) where the training loop keeps them: on the
    host, in page-locked memory on CUDA (`aomd.data.loader.to_device`)."""
    labels = torch.arange(batch_size) // 5
    return labels.pin_memory() if device.type == "cuda" else labels


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


def repeated_seconds(measure_round: Callable[[], dict[str, float]], rounds: int) -> dict[str, list[float]]:
    """{row: [seconds of each round]} of `measure_round`, which times every row once and returns
    {row: seconds}. The rounds interleave the rows (A B C, A B C, ...), so a drift of the card's
    clocks over the run reaches every row alike instead of the rows timed last."""
    timings: dict[str, list[float]] = {}
    for _ in range(rounds):
        for row, seconds in measure_round().items():
            timings.setdefault(row, []).append(seconds)
    return timings


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of seconds / reference, each round against the reference of the same
    round (`repeated_seconds`): a ratio less exposed to drift than the ratio of two medians."""
    assert len(seconds) == len(reference), "one reference per round"
    return statistics.median(s / r for s, r in zip(seconds, reference))


def in_own_processes(script: str, argv: Sequence[str], passes: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Run `python script *argv --only-pass PASS --json FILE` once per pass, each in a fresh Python
    process: (the JSON each pass that succeeded wrote, the passes that failed). The children's
    rows go to this process's stdout; a failed pass gets a row saying so, and the others still run.

    A pass then owes nothing to the passes before it: on an H100 the same bf16 AOMD step took
    30.6 ms in a process that had timed and profiled fp32 steps first and 24.8 ms in a process of
    its own (docs/benchmarks.md)."""
    payloads, failed = [], []
    with tempfile.TemporaryDirectory() as folder:
        for index, name in enumerate(passes):
            out = Path(folder) / f"pass{index}.json"
            sys.stdout.flush()  # this process's lines before the child's
            child = subprocess.run([sys.executable, script, *argv, "--only-pass", name, "--json", str(out)])
            if child.returncode == 0 and out.is_file():
                payloads.append(json.loads(out.read_text()))
            else:
                failed.append(name)
                print(f"| {name} | the pass failed (exit code {child.returncode}; its error is above) |", flush=True)
    return payloads, failed


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    import os
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, PyTorch {torch.__version__}"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
