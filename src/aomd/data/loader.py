"""DataLoaders over an `ImageSplit`: class-balanced training batches and sequential eval batches.

Each loader yields (images uint8 [B, S, S, 3], labels int64 [B]); augmentation happens after the
batch reached its device (`aomd.data.augment`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aomd.data.sampler import ClassBalancedBatchSampler
from aomd.data.splits import ImageSplit


class _BatchReader(Dataset):
    """Indexed by a whole batch of indices at once, so a cache file is read once per batch."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices):
        indices = np.asarray(indices)
        return torch.from_numpy(self.split.take(indices)), torch.from_numpy(self.split.labels[indices])


def train_loader(split: ImageSplit, batch_size: int, images_per_class: int, num_batches: int,
                 seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """`num_batches` class-balanced batches (one epoch)."""
    sampler = ClassBalancedBatchSampler(split.labels, batch_size, images_per_class, num_batches, seed)
    return DataLoader(_BatchReader(split), sampler=sampler, batch_size=None,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)


def eval_loader(split: ImageSplit, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The whole split in order, `batch_size` images at a time."""
    n = len(split)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return DataLoader(_BatchReader(split), sampler=chunks, batch_size=None,
                      num_workers=num_workers, pin_memory=pin_memory)
