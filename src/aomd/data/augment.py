"""Image augmentation as tensor ops on uint8 batches, so it runs wherever the batch is (CPU or GPU).

Train: random `image_size` crop of the stored `base_size` image and a random horizontal flip.
Eval: the centre crop. Both end with ImageNet mean/std normalisation (docs/methods.md, section 1).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from aomd.data.images import decode
from aomd.runtime import from_host

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std [1, 3, 1, 1] on `device`, made once per device (a fresh host-to-device
    copy every batch would make the CPU wait for the device)."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                             torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _MEAN_STD[device]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], ImageNet-normalised (in channels_last memory
    layout: the permuted view keeps the bytes where they are)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _mean_std(x.device)
    return x.sub_(mean).div_(std)


def train_transform(images: torch.Tensor, image_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop + random flip of uint8 [B, S, S, 3] -> float [B, 3, image_size, image_size]."""
    b, h, w, _ = images.shape
    assert h >= image_size and w >= image_size, "crop larger than the stored images"
    device = images.device
    top = torch.randint(0, h - image_size + 1, (b,), generator=generator)
    left = torch.randint(0, w - image_size + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    if device.type == "cpu":
        return _crop_flip_normalise_cpu(images, image_size, top, left, flip)
    # drawn on the CPU (the same draws on every device), sent in one copy that does not wait for
    # the device to finish the previous step
    top, left, flip = from_host(device, torch.stack([top, left, flip.long()]))[0]
    return _crop_flip_normalise_gather(images, image_size, top, left, flip.bool())


def _crop_flip_normalise_gather(images, size: int, top, left, flip) -> torch.Tensor:
    """The accelerator path: every sample's crop in one advanced-indexing op, rows [B, s, 1] and
    columns [B, 1, s] (reversed where flipped)."""
    offsets = torch.arange(size, device=images.device)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = left[:, None] + offsets
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    crops = images[torch.arange(len(images), device=images.device)[:, None, None], rows, cols]
    return normalise(crops)


def _crop_flip_normalise_cpu(images: torch.Tensor, size: int, top, left, flip) -> torch.Tensor:
    """The CPU path of `train_transform`: per-sample numpy slices (views) written straight into
    the output; on a CPU this is an order of magnitude faster than the batched gather."""
    source = images.numpy()
    tops, lefts, flips = top.tolist(), left.tolist(), flip.tolist()
    out = np.empty((len(tops), 3, size, size), np.float32)
    scale = (1.0 / (255.0 * np.array(IMAGENET_STD, np.float32))).reshape(3, 1, 1)
    shift = (-np.array(IMAGENET_MEAN, np.float32) / np.array(IMAGENET_STD, np.float32)).reshape(3, 1, 1)
    for i, (top, left, flip) in enumerate(zip(tops, lefts, flips)):
        crop = source[i, top : top + size, left : left + size]
        out[i] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)
        out[i] *= scale
        out[i] += shift
    return torch.from_numpy(out)


def centre_crop(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The centre `image_size` crop of uint8 [B, S, S, 3], still uint8 [B, s, s, 3] (a view)."""
    h, w = images.shape[1:3]
    assert h >= image_size and w >= image_size, "crop larger than the stored images"
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return images[:, top : top + image_size, left : left + image_size]


def eval_transform(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Centre crop of uint8 [B, S, S, 3] -> float [B, 3, image_size, image_size]."""
    return normalise(centre_crop(images, image_size))


def input_spec(dataset: str, base_size: int, image_size: int) -> dict[str, Any]:
    """What a network trained on `dataset` was fed, as its checkpoints record it (`input`): images
    resized to `base_size` (bilinear), centre `image_size` crops (random ones in training),
    normalised with the ImageNet mean and std."""
    return {"dataset": dataset, "base_size": base_size, "image_size": image_size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def preprocess(images: Sequence[str | Path | Image.Image] | str | Path | Image.Image, base_size: int = 256,
               image_size: int = 224) -> torch.Tensor:
    """Image files or PIL images (or one) -> float [N, 3, image_size, image_size], as the
    evaluation of `aomd.train` feeds a network: resized to `base_size` x `base_size` (bilinear),
    centre crop, ImageNet normalisation. A trained network's sizes are in its checkpoint
    (`model.input` of `aomd.load_model`)."""
    if isinstance(images, (str, Path, Image.Image)):  # one image: a batch of one, not a path's characters
        images = [images]
    if not images:
        raise ValueError("preprocess got no images; pass a list of image files or PIL images.")
    if image_size > base_size:
        raise ValueError(f"image_size {image_size} is larger than base_size {base_size}; the crop is cut from the resized image.")
    return eval_transform(torch.from_numpy(np.stack([decode(image, base_size) for image in images])), image_size)
