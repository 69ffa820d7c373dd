"""Metric-learning losses on embeddings: triplet (L2 or L1) and contrastive (docs/methods.md, section 2)."""
from __future__ import annotations

import torch
from torch import nn

from aomd.losses.samplers import NegativeSampler


def _pair_distance(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """Row-wise L_p distance between x and y [T, D] -> [T]."""
    return (x - y).norm(p=p, dim=1)


class TripletLoss(nn.Module):
    """mean over sampled triplets of max(0, d(a, p) - d(a, n) + margin), d = L2 (p=2) or L1 (p=1);
    the sampler chooses the triplets by L2 distances either way, as the reference's does.

    embeddings: [N, D]; labels: [N]. Returns a scalar (0 when the batch holds no triplet).
    """

    def __init__(self, sampler: NegativeSampler, margin: float = 0.2, p: int = 2):
        super().__init__()
        assert p in (1, 2)
        self.sampler, self.margin, self.p = sampler, margin, p

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, pos, neg = self.sampler(embeddings, labels)
        if len(a) == 0:
            return embeddings.sum() * 0.0
        d_ap = _pair_distance(embeddings[a], embeddings[pos], self.p)
        d_an = _pair_distance(embeddings[a], embeddings[neg], self.p)
        return (d_ap - d_an + self.margin).clamp(min=0).mean()


class ContrastiveLoss(nn.Module):
    """mean over the sampled pairs of d(a, p)^2 (positives) and max(0, margin - d(a, n))^2
    (negatives), d = L2; the positive and negative terms are averaged together."""

    def __init__(self, sampler: NegativeSampler, margin: float = 0.2):
        super().__init__()
        self.sampler, self.margin = sampler, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, pos, neg = self.sampler(embeddings, labels)
        if len(a) == 0:
            return embeddings.sum() * 0.0
        positive = _pair_distance(embeddings[a], embeddings[pos], 2).pow(2)
        negative = (self.margin - _pair_distance(embeddings[a], embeddings[neg], 2)).clamp(min=0).pow(2)
        return torch.cat([positive, negative]).mean()
