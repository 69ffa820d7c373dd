"""What a dataset hands to training: two class-disjoint splits of uint8 images and labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class ImageSplit:
    """One split of a retrieval dataset.

    images: uint8 [N, H, W, 3], a numpy array or an on-demand reader of the HDF5 cache
        (anything with ``len`` and numpy-style indexing by a sorted index array).
    labels: int64 [N], class ids (the two splits of a dataset never share one).
    paths: the original file of each image, when the images came from files.
    """

    images: Any
    labels: np.ndarray
    paths: Sequence[str] | None = None

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.labels), "one label per image"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(np.unique(self.labels))

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at `indices` (any order, repeats allowed) as uint8 [len(indices), H, W, 3]."""
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, np.ndarray):
            return self.images[indices]
        # HDF5 reads want sorted unique indices; reading those once also serves repeats
        unique, inverse = np.unique(indices, return_inverse=True)
        return np.asarray(self.images[unique])[inverse]


@dataclass
class RetrievalData:
    """A dataset ready for training: `train` and `test` splits with disjoint classes.

    Images are stored at `base_size` x `base_size`; the network sees `image_size` crops of them.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    base_size: int
    image_size: int

    def summary(self) -> dict[str, int]:
        """Image and class counts, as logged and written to metrics.json."""
        return {
            "train_images": len(self.train),
            "test_images": len(self.test),
            "train_classes": self.train.num_classes,
            "test_classes": self.test.num_classes,
        }
