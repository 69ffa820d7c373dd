"""DataLoaders over an `ImageSplit`: class-balanced training batches and sequential eval batches.

Each loader yields (images uint8 [B, S, S, 3], labels int64 [B]); `to_device` moves them to the
job's device one batch ahead, so only uint8 bytes cross the bus, and augmentation happens after
the batch reached its device (`aomd.data.augment`).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aomd.data.images import worker_context
from aomd.data.sampler import ClassBalancedBatchSampler
from aomd.data.splits import ImageSplit
from aomd.preemption import ignore_in_worker


class _BatchReader(Dataset):
    """Indexed by a whole batch of indices at once, so a cache file is read once per batch."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices):
        indices = np.asarray(indices)
        return torch.from_numpy(self.split.take(indices)), torch.from_numpy(self.split.labels[indices])


def _loader(split: ImageSplit, batches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A loader of whole batches. The batch indices are drawn in this process (the data order
    does not depend on the number of workers); each worker opens its own cache handle, ignores
    the stop signals (aomd.preemption) and persists across epochs (no fork per epoch or per
    evaluation). The loader draws its workers' seeds from a generator of its own: iterating it
    leaves the global random state, which the training steps draw from, untouched (a run resumed
    in the middle of an epoch continues exactly). It starts no more workers than a pass has
    batches: a small test split read in one batch needs one, not the eight of a CUDA job's
    default on a 16-core host (each a fork of a process that holds the card)."""
    num_workers = min(num_workers, len(batches))
    workers = ({"persistent_workers": True, "prefetch_factor": 4, "multiprocessing_context": worker_context()}
               if num_workers > 0 else {})
    return DataLoader(_BatchReader(split), sampler=batches, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, worker_init_fn=ignore_in_worker, generator=torch.Generator(), **workers)


def train_loader(split: ImageSplit, batch_size: int, images_per_class: int, num_batches: int,
                 seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """`num_batches` class-balanced batches (one epoch each time it is iterated)."""
    sampler = ClassBalancedBatchSampler(split.labels, batch_size, images_per_class, num_batches, seed)
    return _loader(split, sampler, num_workers, pin_memory)


def eval_loader(split: ImageSplit, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The whole split in order, `batch_size` images at a time."""
    n = len(split)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return _loader(split, chunks, num_workers, pin_memory)


def to_device(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
              labels_on_host: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches (uint8 images, labels) on `device`, copied one batch ahead.

    On a CUDA device the copy of batch i+1 is issued on a side stream as soon as batch i has been
    handed out, so it overlaps the training step of batch i (the batches should come from pinned
    memory: `pin_memory=True`); elsewhere the batches are moved as they come. With
    `labels_on_host` the labels stay where the loader made them: the training step's negative
    samplers find their pairs there without waiting for the device (`aomd.losses.samplers`).
    """
    cuda = device.type == "cuda"

    def moved(batch):
        images, labels = batch
        return images.to(device, non_blocking=cuda), labels if labels_on_host else labels.to(device, non_blocking=cuda)

    if not cuda:
        for batch in batches:
            yield moved(batch)
        return
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)
    iterator = iter(batches)

    def issue_copy():
        batch = next(iterator, None)
        if batch is None:
            return None
        with torch.cuda.stream(copy_stream):
            return moved(batch)

    upcoming = issue_copy()
    while upcoming is not None:
        compute_stream.wait_stream(copy_stream)
        for tensor in upcoming:
            if tensor.is_cuda:  # not the labels, kept on the host
                tensor.record_stream(compute_stream)  # its memory is not reused before the step is done
        current, upcoming = upcoming, None
        yield current
        upcoming = issue_copy()
