"""Image augmentation as tensor ops on uint8 batches, so it runs wherever the batch is (CPU or GPU).

Train: random `image_size` crop of the stored `base_size` image and a random horizontal flip.
Eval: the centre crop. Both end with ImageNet mean/std normalisation (METHODS.md section 1).
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W], ImageNet-normalised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def train_transform(images: torch.Tensor, image_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop + random flip of uint8 [B, S, S, 3] -> float [B, 3, image_size, image_size]."""
    b, h, w, _ = images.shape
    assert h >= image_size and w >= image_size, "crop larger than the stored images"
    device = images.device
    top = torch.randint(0, h - image_size + 1, (b,), generator=generator).to(device)
    left = torch.randint(0, w - image_size + 1, (b,), generator=generator).to(device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(device)
    # gather each sample's crop with one advanced-indexing op: rows [B, s, 1], cols [B, 1, s]
    offsets = torch.arange(image_size, device=device)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = left[:, None] + offsets
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    crops = images[torch.arange(b, device=device)[:, None, None], rows, cols]
    return _normalise(crops)


def eval_transform(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Centre crop of uint8 [B, S, S, 3] -> float [B, 3, image_size, image_size]."""
    h, w = images.shape[1:3]
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return _normalise(images[:, top : top + image_size, left : left + image_size])
