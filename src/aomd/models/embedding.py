"""The embedding network: backbone -> global pooling -> linear -> (optional) l2 normalisation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aomd.models.backbones import STAGES, StageTaps, build_backbone


@dataclass(frozen=True)
class Architecture:
    """What it takes to rebuild an embedding network (stored in every checkpoint).

    `transform_input` is GoogLeNet's input re-normalisation, on with ImageNet weights: a network
    trained with it must be rebuilt with it. It says how the network was initialised, not which
    network it is, so it takes no part in equality: a teacher configured as
    `Architecture(backbone, embedding_size, True)` matches its checkpoint either way. `as_dict`
    writes it only when on, so checkpoints without it keep their format, and old checkpoints
    (without the key) load with the default, False.
    """

    backbone: str
    embedding_size: int
    l2normalize: bool = True
    transform_input: bool = field(default=False, compare=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        if not self.transform_input:
            del d["transform_input"]
        return d


class EmbeddingNet(nn.Module):
    """Maps images [N, 3, H, W] to embeddings [N, embedding_size].

    `forward_with_stages` also returns the four stage feature maps [N, C_l, H_l, W_l]
    (ResNet layer1..layer4), which distillation matches.

    `transform_input` (GoogLeNet only) as in `build_backbone`: None is torchvision's choice for
    `pretrained`. The state_dict carries it too (extra state), so loading a checkpoint into a
    network built from the configuration alone (a teacher) restores its preprocessing as well.
    """

    def __init__(self, backbone: str, embedding_size: int, l2normalize: bool = True, pretrained: bool = False,
                 transform_input: bool | None = None):
        super().__init__()
        self.backbone, features = build_backbone(backbone, pretrained, transform_input)
        self.architecture = Architecture(backbone, embedding_size, l2normalize,
                                         bool(getattr(self.backbone, "transform_input", False)))
        self.embedding = nn.Linear(features, embedding_size)
        self._taps = StageTaps(self.backbone, STAGES[backbone])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stages(images)[0]

    def forward_with_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeddings [N, E], [stage 1..4 feature maps])."""
        embeddings = self.embedding(self.backbone(images))
        if self.architecture.l2normalize:
            embeddings = F.normalize(embeddings.float(), dim=1)  # unit norm in fp32 also under the CPU's bf16 autocast
        return embeddings, self._taps.collect()

    def get_extra_state(self) -> dict[str, Any]:
        return {"transform_input": self.architecture.transform_input}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        transform_input = bool(state.get("transform_input", False))
        if hasattr(self.backbone, "transform_input"):
            self.backbone.transform_input = transform_input
        elif transform_input:
            raise ValueError(f"{self.architecture.backbone} has no transform_input")
        self.architecture = replace(self.architecture, transform_input=transform_input)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the extra state hold no such key: they had no transform_input
        state_dict.setdefault(prefix + "_extra_state", {"transform_input": False})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def stage_shapes(self, image_size: int = 64) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each stage's map for `image_size` crops (found with one
        small forward pass, uncompiled: a probe is not worth a graph of its own)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        with torch.compiler.set_stance("force_eager"):
            _, stages = self.forward_with_stages(torch.zeros(1, 3, image_size, image_size, device=device))
        self.train(was_training)
        return [tuple(s.shape[1:]) for s in stages]

    def stage_channels(self, image_size: int = 64) -> list[int]:
        """Channel count of each stage."""
        return [channels for channels, _, _ in self.stage_shapes(image_size)]
