"""Whole training steps: every loss option in every precision, against the floor.

    python benchmarks/train_step.py [--device auto] [--batch-size N] [--image-size S] [--steps 10] [--rounds 3]
                                    [--losses triplet,aomd_mode1,...] [--precisions fp32,bf16,fp16] [--json out.json]
                                    [--compile] [--nondeterministic] [--one-process]

Times the step `python -m aomd.train` runs (`aomd.engine.TrainStep`: on-device augmentation of a
uint8 batch, teacher forward under inference mode (from its frozen copy; a CUDA graph replay with
`train.cuda_graphs=true`), student forward, objective, backward, Adam step (fused on CUDA)),
with the job's defaults for the device (channels_last on CUDA), for each option of the `loss`
config group (the objective exactly as that option builds it) and each precision. Reference
shapes: ResNet18-128 student, ResNet50-512 teacher, batches of 128 crops of 224 px cut from 256 px
images (the default on CUDA; on a CPU, 16 crops of 64 px from 72 px so that it ends in minutes).

Rows per precision:
  floor            teacher forward + student forward-backward + optimiser step, no loss term
                   (the backward starts from the embeddings' mean); like every row, it includes
                   the step's augmentation on the device (a crop and flip of the uint8 batch);
  floor+adapters   the floor plus AOMD's adapters (1x1 conv + ReLU per stage) forward-backward, as
                   the job runs them (fused on CUDA: `train.fused_adapters`, up to the descriptors,
                   a graph of their own where the job's graph goes on to the mapping terms):
                   what AOMD adds beyond its adapters is the difference to this row;
  <loss option>    the real step.
Each precision (a pass) runs in a Python process of its own, as a job does: in one process, the
passes before it changed a pass's bf16 step by a quarter on an H100 (docs/benchmarks.md). Within a
pass, the rows are timed in rounds (floor, floor+adapters, the losses; again; ...), each with a
fresh student and objective, so that drift reaches every row alike.
Columns: ms per step (the median over rounds), the spread of the rounds ((max - min) / median),
images per second, peak device memory allocated (CUDA), step / floor (the median of the rounds'
ratios, each round's step against its own floor).
On CUDA, the floor and the AOMD options also run in fp32 in the standard (contiguous) memory layout,
the baseline of the GPU issue's table. Targets (issue: GPU) printed at the end: AOMD step / floor
<= 1.10, bf16 + channels_last AOMD >= 1.8x fp32 (against that baseline, and against the job's fp32,
which uses channels_last, for comparison).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (batch_labels, device_description, loss_config, loss_options, paired_ratio,  # noqa: E402
                    ratio_text, run_passes, seconds_per_call, time_rows, write_json)

from aomd.engine import TrainStep, adam  # noqa: E402
from aomd.losses.aomd import StageAdapters, stage_descriptors  # noqa: E402
from aomd.losses.objective import StepOutputs  # noqa: E402
from aomd.models import EmbeddingNet  # noqa: E402
from aomd.build import build_objective, network_shape  # noqa: E402
from aomd.runtime import Runtime  # noqa: E402

FLOOR, FLOOR_ADAPTERS = "floor", "floor+adapters"
CONTIGUOUS = "fp32 contiguous"  # fp32 without channels_last: the baseline of the GPU issue's 1.8x target


class FloorObjective(nn.Module):
    """No loss term: the backward starts from the mean of the embeddings, which reaches every
    stage and parameter of the student at no cost of its own. With `adapters`, AOMD's adapters
    run on the student's stages too, up to the descriptors they give AOMD's mapping terms, taken
    as AOMD takes them: fused (`Runtime.prepare_objective`) when `fused`, else eager through
    `stage_descriptors`, whose backward writes each map's gradient in the map's own layout.
    (A mean of each stage map, as this floor took before, sends the stages standard-layout
    gradients in a channels_last network: conversions the AOMD step does not pay, which made the
    floor slower and step / floor look better.)"""

    needs_teacher = True

    def __init__(self, adapters: StageAdapters | None = None):
        super().__init__()
        self.adapters, self.fused = adapters, False

    def forward(self, outputs: StepOutputs):
        total = outputs.student_embeddings.float().mean()
        if self.adapters is not None:
            stages = outputs.student_stages
            descriptors = (self.adapters.descriptors(stages) if self.fused
                           else [stage_descriptors(adapted) for adapted in self.adapters(stages)])
            total = total + sum((g.float().mean() + q.float().mean()) / 2 for g, q in descriptors)
        return total, {}


def student_and_objective(name: str, teacher: EmbeddingNet, size: int, stored: int) -> tuple[EmbeddingNet, nn.Module]:
    """A fresh ResNet18-128 student (seed 0) and the objective of a row: the floor, the floor with
    AOMD's adapters, or a loss option exactly as `python -m aomd.train loss=<name>` builds it."""
    torch.manual_seed(0)
    if name in (FLOOR, FLOOR_ADAPTERS):
        student = EmbeddingNet("resnet18", 128, True, False)
        adapters = None
        if name == FLOOR_ADAPTERS:
            adapters = StageAdapters(network_shape(student, size).stage_channels, network_shape(teacher, size).stage_channels)
        return student, FloorObjective(adapters)
    cfg = loss_config(name, f"dataset.image_size={size}", f"dataset.base_size={stored}")
    student = EmbeddingNet("resnet18", 128, cfg.l2normalize, False)
    return student, build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)


def measure(student, objective, teacher, runtime: Runtime, images, labels, image_size: int, steps: int, warmup: int):
    """(seconds per step, peak bytes allocated) of one configuration."""
    runtime.prepare_network(student).train()
    runtime.prepare_objective(objective).train()
    optimizer = adam([*student.parameters(), *objective.parameters()], 1e-5, 1e-5, runtime)
    step = TrainStep(student, objective, optimizer, runtime, image_size, teacher=teacher)
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(runtime.device)
    seconds = seconds_per_call(lambda: step(images, labels), runtime.device, steps, warmup)
    peak = torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda" else None
    return seconds, peak


def run_pass(label: str, runtime: Runtime, names: list[str], teacher: EmbeddingNet, images, labels, size: int,
             stored: int, args) -> dict[str, dict]:
    """{row: result} of one pass (a precision and memory layout): every row timed in each of
    `args.rounds` rounds, each round with a fresh student and objective (`time_rows`); printed as
    table rows. A row out of device memory is printed as such and left out."""
    runtime.forget_compiled_graphs()  # each pass compiles its own graphs, as a job does
    runtime.prepare_network(teacher).eval().requires_grad_(False)
    peaks: dict[str, float | None] = {}

    def measure_row(name: str) -> float | None:
        student, objective = student_and_objective(name, teacher, size, stored)
        try:
            seconds, peak = measure(student, objective, teacher if objective.needs_teacher else None, runtime,
                                    images, labels, size, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            print(f"| {label} | {name} | out of memory | | | | |", flush=True)
            return None
        peaks[name] = None if peak is None else max(peak, peaks.get(name) or 0)
        return seconds

    rows = {}
    for name, timing in time_rows(measure_row, names, args.rounds, FLOOR).items():
        seconds, peak = timing.seconds, peaks[name]
        rows[name] = {"seconds": seconds, "round_seconds": timing.round_seconds, "images_per_second": len(labels) / seconds,
                      "peak_gb": None if peak is None else peak / 1e9, "over_floor": timing.over_floor}
        memory = "-" if peak is None else f"{peak / 1e9:.2f}"
        print(f"| {label} | {name} | {1e3 * seconds:.1f} | {timing.spread:.0%} | {len(labels) / seconds:,.0f} | {memory} | "
              f"{ratio_text(timing.over_floor)} |", flush=True)
    return rows


def verdicts_of(results: dict[str, dict[str, dict]], compiled: bool, cuda: bool) -> list[str]:
    """The GPU issue's targets, from the results of every pass."""
    verdicts = []
    for precision, rows in results.items():
        for mode in ("aomd_mode1", "aomd_mode2"):
            if mode in rows and rows[mode]["over_floor"] is not None and precision != CONTIGUOUS:
                r = rows[mode]["over_floor"]
                verdict = f"{precision} {mode}: step / floor {r:.2f} (target <= 1.10: {'OK' if r <= 1.10 else 'MISSED'})"
                if FLOOR_ADAPTERS in rows:  # the adapters' share of the floor; the rest against floor+adapters
                    share = rows[FLOOR_ADAPTERS]["over_floor"] - 1
                    own = paired_ratio(rows[mode]["round_seconds"], rows[FLOOR_ADAPTERS]["round_seconds"]) - 1
                    verdict += f"; adapters alone {share:+.0%} of the floor, AOMD's own arithmetic {own:+.0%} of floor+adapters"
                verdicts.append(verdict)
    layout = " (compiled)" if compiled else " + channels_last" if cuda else ""
    for mode in ("aomd_mode1", "aomd_mode2"):
        if mode not in results.get("bf16", {}):
            continue
        bf16 = results["bf16"][mode]["seconds"]
        if mode in results.get(CONTIGUOUS, {}):
            speedup = results[CONTIGUOUS][mode]["seconds"] / bf16
            job_fp32 = (f"; {results['fp32'][mode]['seconds'] / bf16:.2f}x fp32 + channels_last (the job's fp32)"
                        if mode in results.get("fp32", {}) else "")
            verdicts.append(f"{mode}: bf16{layout} is {speedup:.2f}x fp32 in the standard layout, the issue's baseline "
                            f"(target >= 1.8: {'OK' if speedup >= 1.8 else 'MISSED'}){job_fp32}")
        elif mode in results.get("fp32", {}):
            speedup = results["fp32"][mode]["seconds"] / bf16
            # the 1.8x target is against fp32 in the standard layout; the job's fp32 (channels_last on
            # CUDA) is a faster baseline, so judging it here would read a met target as missed
            judged = ("the 1.8x target is not judged without the standard-layout fp32 pass" if cuda
                      else f"target >= 1.8: {'OK' if speedup >= 1.8 else 'MISSED'}")
            verdicts.append(f"{mode}: bf16{layout} is {speedup:.2f}x fp32{layout} ({judged})")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 16 on a CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 64 on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 10 on CUDA, 3 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, each round (default: 3 on CUDA, 1 on a CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over the rows; a row's figure is its median (default: 3 on CUDA, 1 on a CPU)")
    parser.add_argument("--losses", default="all", help="comma-separated loss options (default: all of conf/loss)")
    parser.add_argument("--precisions", default=None, help="default: fp32,bf16,fp16 on CUDA, fp32 on a CPU")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher (train.compile=true)")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="allow non-deterministic kernels and cuDNN autotuning (train.deterministic=false)")
    parser.add_argument("--contiguous-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, with AOMD rows in fp32 and bf16: also time fp32 in the standard memory layout, "
                             "the baseline of the GPU issue's 1.8x target (a process of its own)")
    parser.add_argument("--one-process", action="store_true",
                        help="run every pass in this process (default: each pass in a process of its own)")
    parser.add_argument("--only-pass", default=None, help=argparse.SUPPRESS)  # a child of in_own_processes
    args = parser.parse_args(argv)

    device = Runtime.resolve(args.device).device
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 16)
    size = args.image_size or (224 if cuda else 64)
    args.steps, args.warmup = args.steps or (10 if cuda else 3), args.warmup or (3 if cuda else 1)
    args.rounds = args.rounds or (3 if cuda else 1)
    losses = loss_options() if args.losses == "all" else args.losses.split(",")
    precisions = (args.precisions or ("fp32,bf16,fp16" if cuda else "fp32")).split(",")
    stored = size * 8 // 7  # 256 px stored for 224 px crops, as the benchmarks' caches
    # (label, precision, channels_last (None: the job's default), rows)
    passes = [(precision, precision, None, [FLOOR, FLOOR_ADAPTERS, *losses]) for precision in precisions]
    aomd_modes = [mode for mode in ("aomd_mode1", "aomd_mode2") if mode in losses]
    if cuda and args.contiguous_baseline and not args.compile and aomd_modes and {"fp32", "bf16"} <= set(precisions):
        # the GPU issue's baseline: fp32 in the standard memory layout (the job's fp32 uses channels_last)
        passes.append((CONTIGUOUS, "fp32", False, [FLOOR, *aomd_modes]))
    if args.only_pass:
        passes = [p for p in passes if p[0] == args.only_pass]
        assert passes, f"no pass {args.only_pass!r}"
    else:
        print(f"{device_description(device)}; batch {batch}, {size} px crops of {stored} px, ResNet18-128 student, "
              f"ResNet50-512 teacher; {args.rounds} round(s) of {args.steps} timed steps after {args.warmup} per row"
              + ("" if len(passes) == 1 or args.one_process else "; each pass in a process of its own"), flush=True)
        print("| pass | step | ms | spread over rounds | images/s | peak memory (GB) | step / floor |\n"
              "| --- | --- | --- | --- | --- | --- | --- |", flush=True)

    def run_here(labels_of_passes) -> dict[str, dict[str, dict]]:
        Runtime.resolve(str(device), deterministic=not args.nondeterministic).seed_everything(0)
        images = torch.randint(0, 256, (batch, stored, stored, 3), dtype=torch.uint8, device=device)
        labels = batch_labels(batch, device)
        teacher = EmbeddingNet("resnet50", 512, True, False)
        results = {}
        for label, precision, channels_last, names in (p for p in passes if p[0] in labels_of_passes):
            runtime = Runtime.resolve(str(device), precision, channels_last, compile=args.compile,
                                      deterministic=not args.nondeterministic)
            results[label] = run_pass(label, runtime, names, teacher, images, labels, size, stored, args)
        return results

    def summary(results: dict, failed: list[str]) -> dict:
        not_run = [p[0] for p in passes if p[0] not in results and p[0] not in failed]
        verdicts = (verdicts_of(results, args.compile, cuda) + [f"pass {name}: FAILED (its error is in the log)" for name in failed]
                    + [f"pass {name}: not run (the benchmark stopped before it)" for name in not_run])
        return {"device": device_description(device), "batch_size": batch, "image_size": size, "steps": args.steps,
                "rounds": args.rounds, "results": results, "verdicts": verdicts}

    # written after each pass too: a benchmark stopped at a time limit keeps the verdicts of the passes it ran
    results, failed = run_passes(__file__, argv, [p[0] for p in passes], args.one_process, run_here,
                                 after_each=lambda results, failed: write_json(args.json, summary(results, failed)))
    if args.only_pass:
        write_json(args.json, results)
        return 0

    print()
    final = summary(results, failed)
    print("\n".join(final["verdicts"]))
    write_json(args.json, final)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
