"""The embedding network: backbone -> global pooling -> linear -> (optional) l2 normalisation."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aomd.models.backbones import STAGES, StageTaps, build_backbone


@dataclass(frozen=True)
class Architecture:
    """What it takes to rebuild an embedding network (stored in every checkpoint)."""

    backbone: str
    embedding_size: int
    l2normalize: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


class EmbeddingNet(nn.Module):
    """Maps images [N, 3, H, W] to embeddings [N, embedding_size].

    `forward_with_stages` also returns the four stage feature maps [N, C_l, H_l, W_l]
    (ResNet layer1..layer4), which distillation matches.
    """

    def __init__(self, backbone: str, embedding_size: int, l2normalize: bool = True, pretrained: bool = False):
        super().__init__()
        self.architecture = Architecture(backbone, embedding_size, l2normalize)
        self.backbone, features = build_backbone(backbone, pretrained)
        self.embedding = nn.Linear(features, embedding_size)
        self._taps = StageTaps(self.backbone, STAGES[backbone])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stages(images)[0]

    def forward_with_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeddings [N, E], [stage 1..4 feature maps])."""
        embeddings = self.embedding(self.backbone(images))
        if self.architecture.l2normalize:
            embeddings = F.normalize(embeddings, dim=1)
        return embeddings, self._taps.collect()

    @torch.no_grad()
    def stage_channels(self, image_size: int = 64) -> list[int]:
        """Channel count of each stage (found with one small forward pass)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        _, stages = self.forward_with_stages(torch.zeros(1, 3, image_size, image_size, device=device))
        self.train(was_training)
        return [s.shape[1] for s in stages]
