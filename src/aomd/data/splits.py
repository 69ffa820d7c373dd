"""What a dataset hands to training: two class-disjoint splits of uint8 images and labels."""
from __future__ import annotations

from dataclasses import dataclass, replace
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

    def subset(self, indices: np.ndarray) -> "ImageSplit":
        """The images at `indices` (sorted) as a split of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        # not a copy: a validation split held out of a training split in memory would double it
        images = _IndexedImages(self.images, indices)
        paths = None if self.paths is None else [self.paths[i] for i in indices]
        return ImageSplit(images, self.labels[indices], paths)

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images at `indices` (any order, repeats allowed) as uint8 [len(indices), H, W, 3]."""
        indices = np.asarray(indices, dtype=np.int64)
        if _in_memory(self.images):
            return self.images[indices]
        # HDF5 reads want sorted unique indices; reading those once also serves repeats
        unique, inverse = np.unique(indices, return_inverse=True)
        return np.asarray(self.images[unique])[inverse]


def _in_memory(images: Any) -> bool:
    """Whether a split's images are an array in memory (or some images of one), where any index
    reads at once; an on-demand reader wants sorted unique indices."""
    return isinstance(images, np.ndarray) or (isinstance(images, _IndexedImages) and _in_memory(images.images))


class _IndexedImages:
    """Some images of another split's images (an array in memory or an on-demand reader),
    re-indexed from 0; reads go to those images."""

    def __init__(self, images: Any, indices: np.ndarray):
        if isinstance(images, _IndexedImages):  # a subset of a subset reads the images it came from
            images, indices = images.images, images.indices[indices]
        self.images, self.indices = images, indices
        self.shape = (len(indices), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        return self.images[self.indices[index]]


@dataclass
class RetrievalData:
    """A dataset ready for training: `train` and `test` splits with disjoint classes.

    Images are stored at `base_size` x `base_size`; the network sees `image_size` crops of them.
    `files_digest` fingerprints the files and labels a dataset on disk was read from
    (`DatasetListing.digest`); empty where the settings alone determine the images (synthetic).
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    base_size: int
    image_size: int
    val: ImageSplit | None = None   # held-out training classes that select the epoch (eval.select=val)
    files_digest: str = ""

    def summary(self) -> dict[str, int]:
        """Image and class counts, as logged and written to metrics.json."""
        counts = {
            "train_images": len(self.train),
            "test_images": len(self.test),
            "train_classes": self.train.num_classes,
            "test_classes": self.test.num_classes,
        }
        if self.val is not None:
            counts.update(val_images=len(self.val), val_classes=self.val.num_classes)
        return counts


def hold_out_validation(data: RetrievalData, num_classes: int, seed: int = 0) -> RetrievalData:
    """`data` with `num_classes` of its training classes (drawn with `seed`) moved to a validation
    split: train, validation and test are class-disjoint, as on held-out classes the model
    selection of Musgrave et al. (2020) is done. The images are not copied: both splits read the
    training split's images (in memory or on demand)."""
    classes = np.unique(data.train.labels)
    assert 1 <= num_classes < len(classes), "the validation split needs some classes and must leave some to train"
    held_out = np.sort(np.random.default_rng(seed).choice(classes, size=num_classes, replace=False))
    is_val = np.isin(data.train.labels, held_out)
    return replace(data, train=data.train.subset(np.flatnonzero(~is_val)), val=data.train.subset(np.flatnonzero(is_val)))
