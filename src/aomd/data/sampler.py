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
    images gives all of them. When one pass over the classes leaves room (too few classes, or
    classes of fewer than m images), another pass in a new order follows, taking up to m more of each
    class's images that the batch does not hold yet; an image is repeated in a batch only once
    every image of its class is in it.

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
        in_batch: dict[int, np.ndarray] = {}  # class -> its images in the batch so far
        while len(batch) < self.batch_size:  # loops again only if one pass over the classes leaves room
            for c in self.rng.permutation(len(self.classes)):
                pool = self.indices_of_class[c]
                if c in in_batch:  # a later pass: the class's images not in the batch yet, if any
                    unused = np.setdiff1d(pool, in_batch[c])
                    pool = unused if len(unused) else pool
                take = min(self.images_per_class, len(pool), self.batch_size - len(batch))
                chosen = self.rng.choice(pool, size=take, replace=False)
                in_batch[c] = np.concatenate([in_batch[c], chosen]) if c in in_batch else chosen
                batch.extend(chosen.tolist())
                if len(batch) == self.batch_size:
                    break
        return batch
