"""Where an AOMD training step's time goes on a CUDA card: the device's own work against the
host's launching, and what each of its settings buys.

    python benchmarks/step_anatomy.py [--losses aomd_mode1,aomd_mode2] [--precisions fp32,bf16]
                                      [--settings default,...] [--steps 10] [--warmup 3] [--rounds 3]
                                      [--json out.json] [--one-process]

For each precision and setting, times the step of `benchmarks/train_step.py` (the floor, the floor
with AOMD's adapters, and the AOMD options) and profiles a few steps of each to count the kernels
and sum their device time. Settings:

  before            PyTorch's default Adam (foreach on CUDA), autocast casting the teacher's weights
                    at every step, deterministic mode filling new tensors with NaN: aomd before this
                    version's defaults
  default           the job's CUDA defaults: fused Adam, the frozen teacher's weights stored in the
                    autocast dtype, no NaN fill
  nan_fill          default with deterministic mode's NaN fill of new tensors
  cuda_graphs       default with the teacher's forward replayed from a CUDA graph (`train.cuda_graphs=true`)
  nondeterministic  default with `train.deterministic=false` (cuDNN autotuning)
  unfused_adapters  default with `train.fused_adapters=false`: AOMD's adapters as eager 1x1
                    convolutions + ReLU, then the descriptors (the default before this version)
  compiled          `train.compile=true`: student and teacher compiled, in the standard memory
                    layout (inductor picks its own inside the graphs)
  compiled_cl_inputs  `train.compile=true train.channels_last=true`: compiled networks fed channels_last
                    batches, their parameters in the standard layout (channels_last parameters fail
                    in inductor's convolution backward); the stage maps the compiled networks
                    return, and so the adapters', should be channels_last too

Each precision and setting (a pass) runs in a Python process of its own, its rows timed in rounds,
as in `benchmarks/train_step.py`. Columns: ms per step (the median over rounds), the spread of the
rounds, images/s, kernels per step, device busy ms per step (sum of kernel times: what the step
would take if launching cost nothing), busy / step (near 1: the device is the limit; well below 1:
the host's launching is), step / floor (as in `benchmarks/train_step.py`). Needs CUDA; `--device cpu` runs its code on the CPU with small shapes, for
its test, and counts no kernels there.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (batch_labels, device_description, ratio_text, run_passes, seconds_per_call,  # noqa: E402
                    synchronize, time_rows, write_json)
from train_step import FLOOR, FLOOR_ADAPTERS, student_and_objective  # noqa: E402

from aomd.engine import TrainStep  # noqa: E402
from aomd.models import EmbeddingNet  # noqa: E402
from aomd.runtime import Runtime  # noqa: E402

SETTINGS = ("before", "default", "nan_fill", "cuda_graphs", "nondeterministic", "unfused_adapters", "compiled",
            "compiled_cl_inputs")


class _NoFrozenCopy(Runtime):
    """The runtime as before `Runtime.frozen_copy`: the step runs the teacher itself."""

    def frozen_copy(self, network):
        return network


def runtime_of(setting: str, device: torch.device, precision: str) -> Runtime:
    """The runtime of a setting, its global switches set (deterministic kernels, NaN fill)."""
    compiled = setting.startswith("compiled")
    runtime = Runtime.resolve(str(device), precision, channels_last=True if setting == "compiled_cl_inputs" else None,
                              compile=compiled, cuda_graphs=setting == "cuda_graphs",
                              deterministic=setting != "nondeterministic",
                              fused_adapters=setting not in ("before", "unfused_adapters"))
    runtime.seed_everything(0)
    if setting in ("before", "nan_fill"):
        torch.utils.deterministic.fill_uninitialized_memory = True
    fields = {field.name: getattr(runtime, field.name) for field in dataclasses.fields(runtime)}
    if setting == "before":
        runtime = _NoFrozenCopy(**fields)
    return runtime


def kernel_profile(call, steps: int, device: torch.device) -> tuple[float, float, Counter]:
    """(kernels per step, device busy seconds per step, busy seconds per step by kernel name)
    over `steps` calls (no kernels on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            call()
        synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: Counter = Counter()
    for event in kernels:
        by_name[event.name] += (event.time_range.end - event.time_range.start) / 1e6 / steps
    return len(kernels) / steps, sum(by_name.values()), by_name


def run_pass(precision: str, setting: str, names: list[str], eager_teacher: EmbeddingNet, images, labels,
             args) -> dict[str, Any]:
    """{"rows": {row: result}, "breakdown": the kernels of the pass's last row by device time} of
    one precision and setting: every row timed in `args.rounds` rounds, each with a fresh student
    and objective (`time_rows`), and profiled in the first; printed as table rows. A row that fails
    is printed as such and left out."""
    device, size = images.device, args.image_size
    stored = size * 8 // 7
    runtime = runtime_of(setting, device, precision)
    runtime.forget_compiled_graphs()  # each setting compiles its own graphs, as a job does
    # a compiled setting compiles a copy: the shared teacher keeps its eager forward
    teacher = copy.deepcopy(eager_teacher) if runtime.compile else eager_teacher
    runtime.prepare_network(teacher).eval().requires_grad_(False)
    profiles: dict[str, tuple[float, float, Counter]] = {}

    def measure_row(name: str) -> float | None:
        try:
            student, objective = student_and_objective(name, teacher, size, stored)
            runtime.prepare_network(student).train()
            runtime.prepare_objective(objective).train()
            optimizer = torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-5,
                                         weight_decay=1e-5, fused=setting != "before" or None)
            call = partial(TrainStep(student, objective, optimizer, runtime, size, teacher=teacher), images, labels)
            seconds = seconds_per_call(call, device, args.steps, args.warmup)
            if name not in profiles:
                profiles[name] = kernel_profile(call, args.profiled_steps, device)
            synchronize(device)
            return seconds
        except Exception as error:  # an experiment that fails is a finding, not the end of the run
            print(f"| {precision} | {setting} | {name} | failed: {type(error).__name__}: {str(error)[:200]} | | | | | | |",
                  flush=True)
            return None
        finally:
            student = objective = optimizer = call = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    rows = {}
    for name, timing in time_rows(measure_row, names, args.rounds, FLOOR).items():
        kernels, busy, _ = profiles[name]
        seconds = timing.seconds
        rows[name] = {"seconds": seconds, "round_seconds": timing.round_seconds, "kernels_per_step": kernels,
                      "busy_seconds": busy, "over_floor": timing.over_floor}
        print(f"| {precision} | {setting} | {name} | {1e3 * seconds:.1f} | {timing.spread:.0%} | {len(labels) / seconds:,.0f} | "
              f"{kernels:.0f} | {1e3 * busy:.1f} | {busy / seconds:.2f} | {ratio_text(timing.over_floor)} |", flush=True)
    last = [name for name in names if name in rows]
    breakdown = sorted(profiles[last[-1]][2].items(), key=lambda item: -item[1]) if last else []
    return {"rows": rows, "breakdown": breakdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu only to test the script")
    parser.add_argument("--losses", default="aomd_mode1,aomd_mode2")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the rows; a row's figure is its median")
    parser.add_argument("--profiled-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="kernels listed in the breakdown of the last precision's default step")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one-process", action="store_true",
                        help="run every precision and setting in this process (default: each in a process of its own)")
    parser.add_argument("--only-pass", default=None, help=argparse.SUPPRESS)  # a child of in_own_processes: "precision/setting"
    args = parser.parse_args(argv)
    unknown = [setting for setting in args.settings.split(",") if setting not in SETTINGS]
    if unknown:
        parser.error(f"unknown --settings {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.device != "cpu" and not torch.cuda.is_available():
        print("step_anatomy: needs a CUDA device", file=sys.stderr)
        return 2
    device = Runtime.resolve(args.device).device
    names = [FLOOR, FLOOR_ADAPTERS, *args.losses.split(",")]
    passes = [f"{precision}/{setting}" for precision in args.precisions.split(",") for setting in args.settings.split(",")]
    # the kernel breakdown: of the last precision's default step (its last row)
    breakdown_pass = f"{args.precisions.split(',')[-1]}/default"
    if args.only_pass:
        assert args.only_pass in passes, f"no pass {args.only_pass!r}"
        passes = [args.only_pass]
    else:
        print(f"{device_description(device)}; batch {args.batch_size}, {args.image_size} px crops; {args.rounds} rounds of "
              f"{args.steps} timed steps after {args.warmup} per row; kernels and busy time from {args.profiled_steps} "
              f"profiled steps" + ("" if len(passes) == 1 or args.one_process else "; each pass in a process of its own"),
              flush=True)
        print("| precision | setting | step | ms | spread over rounds | images/s | kernels/step | busy ms | busy / step | "
              "step / floor |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)

    def run_here(names_of_passes) -> dict[str, dict[str, Any]]:
        Runtime.resolve(str(device)).seed_everything(0)  # the rows' runtimes seed again: this is the batch's
        stored = args.image_size * 8 // 7
        images = torch.randint(0, 256, (args.batch_size, stored, stored, 3), dtype=torch.uint8, device=device)
        labels = batch_labels(args.batch_size, device)
        eager_teacher = EmbeddingNet("resnet50", 512, True, False)
        return {name: run_pass(*name.split("/"), names, eager_teacher, images, labels, args) for name in names_of_passes}

    payloads, failed = run_passes(__file__, argv, passes, args.one_process, run_here)
    if args.only_pass:
        write_json(args.json, payloads)
        return 0
    results: dict[str, dict[str, dict]] = {}
    for name, payload in payloads.items():
        precision, setting = name.split("/")
        results.setdefault(precision, {})[setting] = payload["rows"]
    breakdowns = {name: payload["breakdown"] for name, payload in payloads.items()}

    if breakdowns.get(breakdown_pass):
        by_name = breakdowns[breakdown_pass]
        total = sum(seconds for _, seconds in by_name)
        print(f"\nKernels of one step ({breakdown_pass.replace('/', ' ')} {names[-1]}) by device time, "
              f"{1e3 * total:.1f} ms in all:\n| kernel | ms | share |\n| --- | --- | --- |")
        for kernel, seconds in by_name[:args.top]:
            print(f"| {kernel[:110]} | {1e3 * seconds:.2f} | {seconds / total:.0%} |")
        rest = sum(seconds for _, seconds in by_name[args.top:])
        print(f"| {max(len(by_name) - args.top, 0)} other kernels | {1e3 * rest:.2f} | {rest / total:.0%} |")
    print()
    verdicts = []
    for setting in args.settings.split(","):
        for mode in args.losses.split(","):
            try:
                speedup = results["fp32"][setting][mode]["seconds"] / results["bf16"][setting][mode]["seconds"]
                verdicts.append(f"{setting} {mode}: bf16 {speedup:.2f}x fp32; step / floor "
                                f"fp32 {ratio_text(results['fp32'][setting][mode]['over_floor'])}, "
                                f"bf16 {ratio_text(results['bf16'][setting][mode]['over_floor'])}")
            except KeyError:
                pass
    verdicts += [f"pass {name}: FAILED (its error is in the log)" for name in failed]
    print("\n".join(verdicts))
    write_json(args.json, {"device": device_description(device), "rounds": args.rounds, "results": results,
                           "verdicts": verdicts})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
