"""AOMDLoss speed and memory against the floor and the direct outer-product implementation.

At ResNet50 stage shapes (224 px input, batch 32) on the CPU, measures forward + backward of:
  floor   computing the global and local descriptors of every stage (teacher forward, student
          forward and backward) and nothing else: no implementation can do less;
  aomd    aomd.losses.AOMDLoss, mode 1 and mode 2;
  direct  the definition with the per-sample mapping matrices materialised (tests/test_aomd.py).
Prints, from this one run: time(aomd) / time(floor) (target <= 1.3), time(direct mode 1) /
time(aomd mode 1) (target >= 20) and extra memory(direct) / extra memory(aomd) (target >= 10),
where extra memory is the peak resident memory beyond the inputs and the input gradients that
backward returns (the same for every implementation), measured in a fresh process per
implementation (Linux: the peak is reset after the inputs are allocated).

    python benchmarks/aomd_loss.py [--batch 32] [--image-size 224] [--repeats 9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_aomd import direct_aomd  # noqa: E402  the reference the tests check AOMDLoss against

from aomd.losses import AOMDLoss  # noqa: E402
from aomd.losses.aomd import stage_descriptors  # noqa: E402

RESNET50_CHANNELS = (256, 512, 1024, 2048)
STRIDES = (4, 8, 16, 32)


def make_inputs(batch: int, image_size: int):
    """Teacher stage maps (no grad) and adapted student stage maps (requiring grad)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(batch, c, image_size // s, image_size // s) for c, s in zip(RESNET50_CHANNELS, STRIDES)]
    teacher = [torch.rand(shape, generator=g) for shape in shapes]
    student = [torch.rand(shape, generator=g).requires_grad_() for shape in shapes]
    return teacher, student


def floor(teacher, student):
    """The descriptors of every stage and nothing else (their sum, so that backward runs)."""
    total = 0.0
    with torch.no_grad():
        for t in teacher:
            stage_descriptors(t)
    for s in student:
        g, q = stage_descriptors(s)
        total = total + g.sum() + q.sum()
    return total


IMPLEMENTATIONS = {
    "floor": floor,
    "aomd mode 1": AOMDLoss(mode=1),
    "aomd mode 2": AOMDLoss(mode=2),
    "direct mode 1": lambda t, s: direct_aomd(t, s, 1, 1.0, 1.0),
    "direct mode 2": lambda t, s: direct_aomd(t, s, 2, 1.0, 1.0),
}


def step(name, teacher, student):
    for s in student:
        s.grad = None
    IMPLEMENTATIONS[name](teacher, student).backward()


def seconds(names, teacher, student, repeats):
    """Median time of one step of each implementation; repetitions are interleaved so that a
    noisy neighbour on a shared machine slows all implementations alike."""
    times = {name: [] for name in names}
    for name in names:
        step(name, teacher, student)  # warm-up
    for _ in range(repeats):
        for name in names:
            started = time.perf_counter()
            step(name, teacher, student)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def extra_memory_child(name: str, batch: int, image_size: int) -> None:
    """(Run in a fresh process.) Print the peak memory beyond the inputs of one step, in bytes."""
    teacher, student = make_inputs(batch, image_size)
    baseline = _status_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    IMPLEMENTATIONS[name](teacher, student).backward()
    # the input gradients backward returns are the same for every implementation: not "extra"
    gradients = sum(s.grad.numel() * s.grad.element_size() for s in student)
    print(json.dumps({"extra_bytes": (_status_kib("VmHWM:") - baseline) * 1024 - gradients}))


def extra_memory(name: str, batch: int, image_size: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-of", name, "--batch", str(batch),
                          "--image-size", str(image_size)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return extra_memory_child(args.memory_of, args.batch, args.image_size)

    teacher, student = make_inputs(args.batch, args.image_size)
    print(f"ResNet50 stage shapes, {args.image_size} px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} forward+backward steps")
    time_of = seconds(["floor", "aomd mode 1", "aomd mode 2"], teacher, student, args.repeats)
    time_of.update(seconds(["direct mode 1", "direct mode 2"], teacher, student, max(1, args.repeats // 3)))
    memory_of = {name: extra_memory(name, args.batch, args.image_size) for name in IMPLEMENTATIONS}
    print(f"{'':14}{'time (ms)':>12}{'extra memory (MiB)':>22}")
    for name in IMPLEMENTATIONS:
        print(f"{name:14}{1000 * time_of[name]:12.1f}{memory_of[name] / 2**20:22.1f}")
    print("\nratios (targets in brackets):")
    for mode in (1, 2):
        aomd = f"aomd mode {mode}"
        print(f"  mode {mode}: time / floor            {time_of[aomd] / time_of['floor']:8.2f}   (<= 1.3)")
        print(f"  mode {mode}: direct time / time      {time_of[f'direct mode {mode}'] / time_of[aomd]:8.1f}"
              f"   {'(>= 20)' if mode == 1 else ''}")
        print(f"  mode {mode}: direct memory / memory  {memory_of[f'direct mode {mode}'] / max(memory_of[aomd], 1):8.1f}   (>= 10)")


if __name__ == "__main__":
    main()
