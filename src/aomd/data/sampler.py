"""Class-balanced batches (docs/methods.md, section 1)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yields `num_batches` batches of `batch_size` indices built class by class.

    For each batch the classes are visited in a random order and up to `images_per_class` (m)
    random images are taken from each until the batch is full; the last class visited fills
    only what is left (batch 128 with m = 5 is 25 classes x 5 + 3). A class with fewer than m
    images gives all of them.

    `skip(k)` makes the next epoch yield only its batches after the first k (they are still
    drawn, so the random stream is the one of a whole epoch): a run resumed in the middle of an
    epoch sees the batches it had not trained on yet.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, images_per_class: int, num_batches: int, seed: int = 0):
        assert batch_size >= 1 and images_per_class >= 1 and num_batches >= 1
        labels = np.asarray(labels)
        self.classes, inverse = np.unique(labels, return_inverse=True)
        self.indices_of_class = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        assert len(labels) > 0, "no images to sample from"
        self.batch_size = batch_size
        self.images_per_class = images_per_class
        self.num_batches = num_batches
        self.rng = np.random.default_rng(seed)
        self._skip = 0

    def __len__(self) -> int:
        return self.num_batches

    def skip(self, num_batches: int) -> None:
        assert 0 <= num_batches <= self.num_batches, num_batches
        self._skip = num_batches

    def __iter__(self) -> Iterator[list[int]]:
        skipped, self._skip = self._skip, 0
        for index in range(self.num_batches):
            batch = self._batch()
            if index >= skipped:
                yield batch

    def _batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:  # loops again only if all classes together are too few
            for c in self.rng.permutation(len(self.classes)):
                pool = self.indices_of_class[c]
                take = min(self.images_per_class, len(pool), self.batch_size - len(batch))
                batch.extend(self.rng.choice(pool, size=take, replace=False).tolist())
                if len(batch) == self.batch_size:
                    break
        return batch
