"""Training-batch throughput: the packed HDF5 cache against decoding the original JPEGs.

    python benchmarks/data_loading.py [--images 300] [--seconds 8] [--batch-size 32] [--workers 0] [--threads N]
    python benchmarks/data_loading.py --to-device [--device auto] [--images 4000] [--batch-size 128]
                                      [--workers auto] [--train-step-json train_step.json]

Writes Cars196-like JPEGs (about 700 x 480 px) into a temporary folder as a class-per-folder
collection, packs them with `dataset=folder`'s loader (256 px, as for the real benchmarks), then
draws class-balanced training batches through the same DataLoader and the same augmentation
(random 224 crop + flip + normalisation, `aomd.data.augment.train_transform`) from
1. the cache, read on demand (the default, `dataset.in_memory=false`),
2. the cache loaded into memory (`dataset.in_memory=true`),
3. the original files, decoded and resized to 256 px for every image of every batch (what the
   reference implementation does every epoch),
and prints images per second of each, with and without the augmentation, and the ratio of (1)
to (3) with it. Exits with status 1 when the cached path is less than --target times faster
(default 5).

With --to-device it measures the whole path a training job uses instead, from the packed cache
(random 256 px images; read on demand and in memory) to augmented 224 px crops on the device:
class-balanced batches read by DataLoader workers (each with its own HDF5 handle) into pinned
memory, copied as uint8 one batch ahead (`aomd.data.loader.to_device`), cropped, flipped and
normalised on the device. With --train-step-json (written by benchmarks/train_step.py on the same
device) it also prints the ratio to the bf16 AOMD step rate (target >= 1.5: the device never
waits for data).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_description, noise_dataset, synchronize, write_json  # noqa: E402

from aomd.data.augment import train_transform  # noqa: E402
from aomd.data.folder import load_folder  # noqa: E402
from aomd.data.images import DecodedImages  # noqa: E402
from aomd.data.loader import to_device, train_loader  # noqa: E402
from aomd.data.splits import ImageSplit  # noqa: E402
from aomd.runtime import Runtime  # noqa: E402

BASE_SIZE, IMAGE_SIZE = 256, 224


def write_car_like_jpegs(root: Path, count: int, classes: int, seed: int = 0) -> None:
    """`count` JPEGs of about 700 x 480 px in `classes` class folders: a gradient background, a
    few filled shapes and mild noise, so they compress (and decode) like photographs."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = int(rng.integers(640, 760)), int(rng.integers(430, 530))
        ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
        top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
        pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, 6, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 80))
            box = (x0, y0, x0 + int(rng.integers(60, 300)), y0 + int(rng.integers(40, 200)))
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.jpg", quality=90)


def images_per_second(split: ImageSplit, batch_size: int, seconds: float, workers: int, augment: bool = True) -> float:
    """Class-balanced batches of `split` through the DataLoader (and the train augmentation when
    `augment`), for about `seconds` after one warm-up batch; the images per second."""
    batches = max(4, int(seconds * 100))  # an upper bound; the loop stops on time
    loader = train_loader(split, batch_size, images_per_class=5, num_batches=batches, seed=0, num_workers=workers)
    generator = torch.Generator().manual_seed(0)
    done, started = 0, None
    for images, _ in loader:
        if augment:
            train_transform(images, IMAGE_SIZE, generator)
        if started is None:  # the first batch pays for opening files and starting workers
            started = time.perf_counter()
            continue
        done += len(images)
        if time.perf_counter() - started >= seconds and done >= 3 * batch_size:
            break
    return done / (time.perf_counter() - started)


def device_path_rate(split: ImageSplit, runtime: Runtime, batch_size: int, seconds: float) -> float:
    """Images per second from `split` to augmented crops on the device, after two warm-up batches."""
    batches = max(8, int(seconds * 200))  # an upper bound; the loop stops on time
    loader = train_loader(split, batch_size, images_per_class=5, num_batches=batches, seed=0,
                          num_workers=runtime.num_workers, pin_memory=runtime.pin_memory)
    generator = torch.Generator().manual_seed(0)
    done, started = 0, None
    for index, (images, _) in enumerate(to_device(loader, runtime.device)):
        train_transform(images, IMAGE_SIZE, generator)
        if index == 1:  # the first batches pay for starting workers and opening files
            synchronize(runtime.device)
            started = time.perf_counter()
        elif index > 1:
            done += len(images)
            if time.perf_counter() - started >= seconds:
                break
    synchronize(runtime.device)
    return done / (time.perf_counter() - started)


def main_to_device(args) -> int:
    workers = args.workers or "auto"
    runtime = Runtime.resolve(args.device, num_workers=workers if workers == "auto" else int(workers))
    step_rate, notes = None, []
    if args.train_step_json:
        try:
            step = json.loads(Path(args.train_step_json).read_text())
        except (OSError, ValueError) as error:
            step = None
            notes.append(f"no ratio: {args.train_step_json} could not be read ({error})")
        measured_on = str(step.get("device", "an unnamed device")) if isinstance(step, dict) else None
        if step is not None and not isinstance(step, dict):
            step = None
            notes.append(f"no ratio: {args.train_step_json} is not train_step.py's results")
        # the card's (or CPU's) name, the description's first part; the rest (threads, versions) may differ
        elif step is not None and measured_on.split(",")[0] != device_description(runtime.device).split(",")[0]:
            notes.append(f"no ratio: {args.train_step_json} was measured on {measured_on}, not on this device")
        elif step is not None:
            results = step.get("results", {})
            step_rate = max(results.get("bf16", {}).get(mode, {}).get("images_per_second", 0)
                            for mode in ("aomd_mode1", "aomd_mode2")) or None
            if step_rate is None:
                notes.append(f"no ratio: {args.train_step_json} holds no bf16 AOMD step")
    for note in notes:
        print(note, flush=True)
    with tempfile.TemporaryDirectory(prefix="aomd-bench-") as tmp:
        started = time.perf_counter()
        on_demand = noise_dataset(tmp, args.images, 64, 50, BASE_SIZE, IMAGE_SIZE, in_memory=False).train
        in_memory = noise_dataset(tmp, args.images, 64, 50, BASE_SIZE, IMAGE_SIZE, in_memory=True).train
        print(f"{device_description(runtime.device)}; {len(on_demand)} images of {BASE_SIZE} px packed in "
              f"{time.perf_counter() - started:.1f} s; batches of {args.batch_size} crops of {IMAGE_SIZE} px, "
              f"{runtime.num_workers} workers, pinned memory {runtime.pin_memory}:", flush=True)
        rates = {}
        for name, split in (("cache, read on demand", on_demand), ("cache, in memory", in_memory)):
            rates[name] = device_path_rate(split, runtime, args.batch_size, args.seconds)
            ratio = f" = {rates[name] / step_rate:.2f}x the bf16 AOMD step rate ({step_rate:,.0f} images/s)" if step_rate else ""
            print(f"  {name:<24} {rates[name]:9,.0f} images/s{ratio}", flush=True)
    slowest = min(rates.values())
    verdict = None
    if step_rate:
        verdict = f"data path / bf16 AOMD step: {slowest / step_rate:.2f} (target >= 1.5: {'OK' if slowest >= 1.5 * step_rate else 'MISSED'})"
        print(verdict)
    write_json(args.json, {"device": device_description(runtime.device), "workers": runtime.num_workers,
                           "batch_size": args.batch_size, "images_per_second": rates, "step_rate": step_rate,
                           "verdict": verdict,
                           "lines": [f"{name}: {rate:,.0f} images/s" for name, rate in rates.items()] + notes})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 300; --to-device: 4000)")
    parser.add_argument("--classes", type=int, default=30, help="class folders (default 30)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32; --to-device: 128")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per path (default 8)")
    parser.add_argument("--workers", default=None, help="DataLoader workers, the same for every path (--to-device: default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--target", type=float, default=5.0, help="the speed-up the cache must reach (default 5)")
    parser.add_argument("--to-device", action="store_true", help="measure the full path to the device instead")
    parser.add_argument("--device", default="auto", help="with --to-device: auto, cpu or cuda")
    parser.add_argument("--train-step-json", default=None, help="with --to-device: train_step.py's results, for the ratio")
    parser.add_argument("--json", default=None, help="with --to-device: also write the results to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.to_device:
        args.images, args.batch_size = args.images or 4000, args.batch_size or 128
        return main_to_device(args)
    args.workers = int(args.workers or 0)
    args.images, args.batch_size = args.images or 300, args.batch_size or 32

    with tempfile.TemporaryDirectory(prefix="aomd-bench-") as tmp:
        root, cache_dir = Path(tmp) / "images", Path(tmp) / "cache"
        started = time.perf_counter()
        write_car_like_jpegs(root, args.images, args.classes)
        sizes = [p.stat().st_size for p in root.rglob("*.jpg")]
        widths = [Image.open(p).size for p in list(root.rglob("*.jpg"))[:20]]
        print(f"{len(sizes)} JPEGs, about {np.mean([w for w, _ in widths]):.0f} x {np.mean([h for _, h in widths]):.0f} px, "
              f"{np.mean(sizes) / 1e3:.0f} kB each (written in {time.perf_counter() - started:.1f} s)")

        # train_fraction close to 1: (nearly) every image is in the train split that is measured
        options = dict(train_fraction=0.97, base_size=BASE_SIZE, image_size=IMAGE_SIZE, cache_dir=cache_dir,
                       skip_bad_images=False, decode_workers=None, progress=False)
        started = time.perf_counter()
        cached = load_folder(root, in_memory=False, **options).train
        packing = time.perf_counter() - started
        print(f"packing the cache once: {packing:.1f} s ({args.images / packing:.0f} images/s, all cores)")
        in_memory = load_folder(root, in_memory=True, **options).train
        decoded = ImageSplit(DecodedImages(cached.paths, BASE_SIZE), cached.labels, cached.paths)

        print(f"training batches of {args.batch_size} ({IMAGE_SIZE} px crops of {BASE_SIZE} px images), "
              f"{len(cached)} images, {args.workers} DataLoader workers, {torch.get_num_threads()} torch threads:")
        print(f"  {'':<24} {'loading + augmentation':>24} {'loading only':>14}")
        rates, loading = {}, {}
        for name, split in (("cache, read on demand", cached), ("cache, in memory", in_memory),
                            ("decoding the JPEGs", decoded)):
            rates[name] = images_per_second(split, args.batch_size, args.seconds, args.workers)
            loading[name] = images_per_second(split, args.batch_size, args.seconds / 2, args.workers, augment=False)
            print(f"  {name:<24} {rates[name]:15.0f} images/s {loading[name]:7.0f} images/s", flush=True)

    ratio = rates["cache, read on demand"] / rates["decoding the JPEGs"]
    verdict = "OK" if ratio >= args.target else f"BELOW the {args.target:g}x target"
    print(f"loading only: the cache (read on demand) is "
          f"{loading['cache, read on demand'] / loading['decoding the JPEGs']:.0f}x faster than decoding")
    print(f"speed-up of the cache (read on demand) over decoding, same augmentation: {ratio:.1f}x ({verdict})")
    return 0 if ratio >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
