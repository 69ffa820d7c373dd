"""What the benchmarks share: a packed dataset of the benchmarks' shapes, timing, composed configs."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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
    host (`aomd.data.loader.to_device`), in page-locked memory on CUDA (the loader's `pin_memory`)."""
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


@dataclass(frozen=True)
class RowTiming:
    """A row's time per step over the rounds of `time_rows`."""

    round_seconds: list[float]
    over_floor: float | None  # the median of the rounds' ratios to the floor row; None without one

    @property
    def seconds(self) -> float:
        """The median over the rounds."""
        return statistics.median(self.round_seconds)

    @property
    def spread(self) -> float:
        """(slowest round - fastest round) / median."""
        return (max(self.round_seconds) - min(self.round_seconds)) / self.seconds


def time_rows(measure: Callable[[str], float | None], names: Sequence[str], rounds: int, floor: str) -> dict[str, RowTiming]:
    """{row: RowTiming} of the rows `names`, each timed once per round by `measure(name)` (seconds
    per step, or None when the row failed: it is left out, and not measured again).

    The rounds interleave the rows (A B C, A B C, ...), so a drift of the card's clocks over the
    run reaches every row alike instead of the rows timed last; a row's step / floor pairs each of
    its rounds with the floor's round (`paired_ratio`)."""
    timings: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in list(timings):
            seconds = measure(name)
            if seconds is None:
                del timings[name]
            else:
                timings[name].append(seconds)
    return {name: RowTiming(seconds, paired_ratio(seconds, timings[floor]) if floor in timings else None)
            for name, seconds in timings.items()}


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of seconds / reference, each round against the reference of the same
    round (`time_rows`): a ratio less exposed to drift than the ratio of two medians."""
    assert len(seconds) == len(reference), "one reference per round"
    return statistics.median(s / r for s, r in zip(seconds, reference))


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def run_passes(script: str, argv: Sequence[str] | None, passes: Sequence[str], one_process: bool,
               run_here: Callable[[Sequence[str]], dict[str, Any]],
               after_each: Callable[[dict[str, Any], list[str]], None] | None = None) -> tuple[dict[str, Any], list[str]]:
    """({pass: its payload}, the passes that failed): with several passes, unless `one_process`,
    each in a Python process of its own (`in_own_processes`: the script run again with
    `--only-pass`), `after_each(payloads so far, failed so far)` called after each, so that a
    benchmark stopped at a time limit keeps the passes it finished; otherwise `run_here(passes)`
    in this process."""
    if len(passes) == 1 or one_process:
        return run_here(passes), []
    return in_own_processes(script, sys.argv[1:] if argv is None else argv, passes, after_each)


def in_own_processes(script: str, argv: Sequence[str], passes: Sequence[str],
                     after_each: Callable[[dict[str, Any], list[str]], None] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Run `python script *argv --only-pass PASS --json FILE` once per pass, each in a fresh Python
    process: ({pass: its payload} of the passes that succeeded, the passes that failed). A child
    runs its pass and writes {PASS: its payload} (`run_passes`). The children's rows go to this
    process's stdout; a failed pass gets a row saying so, and the others still run.

    A pass then owes nothing to the passes before it: on an H100 the same bf16 AOMD step took
    30.6 ms in a process that had timed and profiled fp32 steps first and 24.8 ms in a process of
    its own (docs/benchmarks.md)."""
    payloads, failed = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for index, name in enumerate(passes):
            out = Path(folder) / f"pass{index}.json"
            sys.stdout.flush()  # this process's lines before the child's
            child = subprocess.run([sys.executable, script, *argv, "--only-pass", name, "--json", str(out)])
            if child.returncode == 0 and out.is_file():
                payloads.update(json.loads(out.read_text()))
            else:
                failed.append(name)
                print(f"| {name} | the pass failed (exit code {child.returncode}; its error is above) |", flush=True)
            if after_each is not None:
                after_each(payloads, failed)
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
