"""The reference recipe's wall time, from measured epochs of the real training loop.

    python benchmarks/recipe_epoch.py [--device auto] [--loss aomd_mode2] [--epochs 3] [--in-memory]
                                      [--compile] [--channels-last null|true|false] [--keep-crops null|true|false]
                                      [--num-workers auto|N]
                                      [--json out.json]

Runs `aomd.engine.fit` (the loop `python -m aomd.train` runs: data path, steps, evaluation after
every epoch, checkpoints) with the recipe's shapes on a Cars196-sized dataset of random 256 px
images in a packed cache: 8,054 train images of 98 classes, 8,131 test images of 98 classes;
an epoch is 100 batches of 128 crops of 224 px; ResNet18-128 student, ResNet50-512 teacher; the
job's defaults for the device (bf16 + channels_last + workers on CUDA). The first trained epoch
is a warm-up (it holds the compilations: the networks' with --compile, AOMD's fused adapters' on
CUDA, from inductor's cache on disk where an earlier job compiled the same); the 80-epoch recipe is
extrapolated as
    evaluation at epoch 0 + epoch 1 + 79 x (mean wall time of the later epochs, evaluation included)
and compared with the reference implementation's measured 618 images/s on an H200, both as
the recipe's wall time (evaluation, warm-up and checkpoints included, which the reference's figure
does not hold) and as the training rate of the later epochs (batch waits included).
Its checkpoint seconds are those the loop waits for its checkpoints (their copies to the CPU; the
writes run in a background thread). On a CPU the defaults shrink (batches of 16 crops of 64 px,
5 batches per epoch) so it ends in minutes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from torch._dynamo.utils import counters  # dynamo's count of the graphs it compiled
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CARS196_SPLIT, device_description, loss_config, noise_dataset, write_json  # noqa: E402

from aomd import engine  # noqa: E402
from aomd.models.checkpoint import CheckpointWriter  # noqa: E402
from aomd.engine import fit  # noqa: E402
from aomd.losses.objective import Objective  # noqa: E402
from aomd.models import EmbeddingNet  # noqa: E402
from aomd.build import build_objective  # noqa: E402
from aomd.runtime import Runtime  # noqa: E402

RECIPE_EPOCHS, RECIPE_ITERS, RECIPE_BATCH = 80, 100, 128
REFERENCE_IMAGES_PER_SECOND = 618  # the reference AOMD script on one H200 (issue: GPU)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--loss", default="aomd_mode2")
    parser.add_argument("--epochs", type=int, default=3, help="epochs measured (the first is a warm-up)")
    parser.add_argument("--in-memory", action="store_true", help="load the cache into memory (default: read on demand)")
    parser.add_argument("--nondeterministic", action="store_true", help="train.deterministic=false")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--channels-last", default="null", choices=("null", "true", "false"),
                        help="train.channels_last (with --compile, true: channels_last batches, standard-layout parameters)")
    parser.add_argument("--num-workers", default="auto", help="train.num_workers (auto: the job's default, 0 on the CPU)")
    parser.add_argument("--keep-crops", default="null", choices=("null", "true", "false"),
                        help="eval.keep_crops (null: the job's default, kept on CUDA)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be 2 or more: the first epoch is a warm-up, the later ones are extrapolated")

    num_workers = args.num_workers if args.num_workers == "auto" else int(args.num_workers)
    channels_last = {"null": None, "true": True, "false": False}[args.channels_last]
    runtime = Runtime.resolve(args.device, args.precision, channels_last, compile=args.compile, num_workers=num_workers,
                              deterministic=not args.nondeterministic)
    cuda = runtime.device.type == "cuda"
    batch, iters, size = (RECIPE_BATCH, RECIPE_ITERS, 224) if cuda else (16, 5, 64)
    split = CARS196_SPLIT if cuda else {"train_images": 400, "test_images": 400, "train_classes": 20, "test_classes": 20}
    cfg = loss_config(args.loss, f"train.epochs={args.epochs}", f"train.iters_per_epoch={iters}",
                      f"train.batch_size={batch}", "train.images_per_class=5", "train.progress=false",
                      f"train.device={runtime.device}", f"train.precision={runtime.precision}",
                      f"train.compile={args.compile}", f"train.channels_last={args.channels_last}",
                      f"train.deterministic={not args.nondeterministic}",
                      f"eval.keep_crops={args.keep_crops}")
    runtime.seed_everything(0)
    with tempfile.TemporaryDirectory(prefix="aomd-bench-") as tmp:
        started = time.perf_counter()
        data = noise_dataset(tmp, split["train_images"], split["test_images"], split["train_classes"],
                             base_size=size * 8 // 7, image_size=size, in_memory=args.in_memory)
        print(f"{device_description(runtime.device)}; {runtime.precision}, channels_last {runtime.channels_last}, "
              f"{runtime.num_workers} workers; {data.summary()} packed in {time.perf_counter() - started:.1f} s; "
              f"{args.loss}, epochs of {iters} batches of {batch} at {size} px", flush=True)
        student = EmbeddingNet("resnet18", 128, cfg.l2normalize, False)
        teacher = EmbeddingNet("resnet50", 512, True, False).eval() if Objective.distils(cfg.loss) else None
        objective = build_objective(cfg.loss, cfg.sampler, student, teacher, cfg.dataset.image_size)
        stamps = [time.perf_counter()]
        training_seconds, checkpoint_seconds, batch_wait_seconds = [], [0.0], [0.0]
        untimed = {name: getattr(CheckpointWriter, name) for name in ("save", "wait")}
        untimed_to_device = engine.to_device

        def timed_to_device(batches, device, **options):
            """The loop's batches, with the time the training loop waits for each counted (an upper
            bound on the time the device waits for data: it may still be busy with queued steps)."""
            batches_iterator = untimed_to_device(batches, device, **options)
            # the evaluation hands over its loader; the training loop an epoch of its loader, started
            # (engine.epoch_batches) before the evaluation that precedes it
            training = not isinstance(batches, DataLoader)
            while True:
                started = time.perf_counter()
                batch = next(batches_iterator, None)
                if training:
                    batch_wait_seconds[-1] += time.perf_counter() - started
                if batch is None:
                    return
                yield batch

        def timed(method):
            def timed_method(*args, **kwargs):
                started = time.perf_counter()
                method(*args, **kwargs)
                checkpoint_seconds[-1] += time.perf_counter() - started
            return timed_method

        def on_epoch(record, is_best):
            # an epoch's wall time: the previous epoch's last.pt, training, evaluation, best.pt
            stamps.append(time.perf_counter())
            wall, saving = stamps[-1] - stamps[-2], checkpoint_seconds[-1]
            if record["epoch"]:
                training_seconds.append(record["epoch_seconds"])
                print(f"  epoch {record['epoch']}: {wall:.2f} s ({record['epoch_seconds']:.2f} s training at "
                      f"{record['images_per_second']:,.0f} images/s, of which {batch_wait_seconds[-1]:.2f} s waiting for "
                      f"batches; {wall - record['epoch_seconds'] - saving:.2f} s evaluation, {saving:.2f} s checkpoints)",
                      flush=True)
            else:
                print(f"  epoch 0: {wall:.2f} s (evaluation only)", flush=True)
            checkpoint_seconds.append(0.0)
            batch_wait_seconds.append(0.0)

        for name, method in untimed.items():  # the time the loop waits for its checkpoints (copies, full queue)
            setattr(CheckpointWriter, name, timed(method))
        engine.to_device = timed_to_device
        graphs_before = counters["stats"]["unique_graphs"]
        try:
            fit(student, objective, data, cfg.train, cfg.eval, runtime, Path(tmp) / "run", on_epoch, teacher)
        finally:
            for name, method in untimed.items():
                setattr(CheckpointWriter, name, method)
            engine.to_device = untimed_to_device
        compiled_graphs = counters["stats"]["unique_graphs"] - graphs_before
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    evaluation, later = durations[0], durations[2:]
    per_epoch = sum(later) / len(later)
    # the warm-up epoch counts as it ran: compiling is part of a compiled job's time
    recipe_seconds = evaluation + durations[1] + (RECIPE_EPOCHS - 1) * per_epoch
    recipe_images = RECIPE_EPOCHS * RECIPE_ITERS * RECIPE_BATCH
    reference_seconds = recipe_images / REFERENCE_IMAGES_PER_SECOND
    mean_later = lambda values: sum(values[-len(later):]) / len(later)  # noqa: E731
    training, saving = mean_later(training_seconds), mean_later(checkpoint_seconds[1:len(durations)])
    batch_wait = mean_later(batch_wait_seconds[1:len(durations)])
    lines = [f"mean epoch: {per_epoch:.2f} s ({training:.2f} s training, of which {batch_wait:.2f} s waiting for batches; "
             f"{per_epoch - training - saving:.2f} s evaluation, {saving:.2f} s checkpoints); first evaluation {evaluation:.2f} s"]
    if compiled_graphs:  # the networks (--compile), AOMD's fused adapters (train.fused_adapters, CUDA's default)
        lines.append(f"{compiled_graphs} graphs compiled, in the first evaluation and epoch")
    training_rate = iters * batch / training
    if cuda:
        lines.append(f"reference recipe ({RECIPE_EPOCHS} x {RECIPE_ITERS} x {RECIPE_BATCH} at 224 px, evaluation after every epoch): "
                     f"{recipe_seconds / 60:.1f} min extrapolated (target <= 6 min: {'OK' if recipe_seconds <= 360 else 'MISSED'}); "
                     f"the reference script at {REFERENCE_IMAGES_PER_SECOND} images/s: {reference_seconds / 60:.1f} min, "
                     f"{reference_seconds / recipe_seconds:.1f}x slower (target >= 8x read as wall time: "
                     f"{'OK' if reference_seconds >= 8 * recipe_seconds else 'MISSED'}); not counted: the job's start "
                     f"(imports, packing the cache once, loading the teacher) and the last epoch's checkpoint flush")
        # the "8x the reference's 618 img/s" read as a rate: the reference's figure is its
        # training rate, without its evaluation, so this compares like with like
        lines.append(f"training rate, batch waits included: {training_rate:,.0f} images/s, "
                     f"{training_rate / REFERENCE_IMAGES_PER_SECOND:.1f}x the reference's {REFERENCE_IMAGES_PER_SECOND} "
                     f"(target >= 8x read as a rate: {'OK' if training_rate >= 8 * REFERENCE_IMAGES_PER_SECOND else 'MISSED'})")
    print("\n".join(lines))
    write_json(args.json, {"device": device_description(runtime.device), "precision": runtime.precision,
                           "loss": args.loss, "epoch_seconds": durations, "training_seconds": training_seconds,
                           "checkpoint_seconds": checkpoint_seconds[1:len(durations)],
                           "batch_wait_seconds": batch_wait_seconds[1:len(durations)], "training_images_per_second": training_rate, "compiled_graphs": compiled_graphs,
                           # the extrapolation to the reference recipe: at its shapes only (a CPU runs a smaller one)
                           **({"recipe_minutes": recipe_seconds / 60,
                               "speedup_over_reference": reference_seconds / recipe_seconds,
                               "training_speedup_over_reference": training_rate / REFERENCE_IMAGES_PER_SECOND} if cuda else {}),
                           "lines": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
