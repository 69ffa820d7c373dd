"""The distillation baselines of docs/methods.md, section 4.

Every loss is called as ``loss(teacher, student)``, teacher first as in `AOMDLoss`; teacher
inputs come from a network run under no-grad.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aomd.errors import UserError
from aomd.losses.aomd import match_spatial
from aomd.runtime import at_least_float32, in_feature_precision


class IncompatibleNetworks(UserError, ValueError):
    """The teacher's and the student's outputs cannot be compared by a term."""


def pairwise_distance(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances [N, N] between rows of e [N, D]; differentiable, exactly 0 on the diagonal."""
    squared = e.pow(2).sum(1)
    d2 = (squared[:, None] + squared[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class SimilarityPreservingLoss(nn.Module):
    """Similarity-Preserving on embeddings [N, D]: G = e e^T with rows l2-normalised;
    loss = sum((G_t - G_s)^2) / N^2 (the batch definition of Tung & Mori, 2019)."""

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        g_t = F.normalize(teacher @ teacher.t(), dim=1)
        g_s = F.normalize(student @ student.t(), dim=1)
        return (g_t - g_s).pow(2).sum() / len(student) ** 2


class AttentionTransferLoss(nn.Module):
    """Attention Transfer over stages [N, C_l, H_l, W_l]: a = l2-normalise(flatten(mean_C f^2));
    loss = sum over stages of mean((a_s - a_t)^2). Teacher and student stages need equal H, W."""

    @staticmethod
    def attention(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_float32(f).pow(2).mean(1).flatten(1), dim=1)

    def forward(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        total = student[0].new_zeros(())
        for t, s in zip(teacher, student):
            if t.shape[-2:] != s.shape[-2:]:
                raise IncompatibleNetworks(f"Attention Transfer needs equal spatial sizes, got teacher {tuple(t.shape[-2:])} and student {tuple(s.shape[-2:])}; use backbones with the same strides.")
            total = total + (self.attention(s) - self.attention(t)).pow(2).mean()
        return total


class FitNetLoss(nn.Module):
    """FitNet hints: per input pair, a 1x1 regressor from student to teacher width
    (weights uniform(-0.005, 0.005), no bias, optimised with the student);
    loss = sum over pairs of mean((regressor(s) - t)^2). Inputs are feature maps [N, C, H, W]
    or embeddings [N, D] (treated as 1x1 maps); larger maps are pooled to the smaller size."""

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int]):
        super().__init__()
        self.regressors = nn.ModuleList(nn.Conv2d(s, t, 1, bias=False) for s, t in zip(student_widths, teacher_widths))
        for regressor in self.regressors:
            nn.init.uniform_(regressor.weight, -0.005, 0.005)

    def forward(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
        total = student[0].new_zeros(())
        for regressor, t, s in zip(self.regressors, teacher, student):
            t, s = (x[:, :, None, None] if x.dim() == 2 else x for x in (t, s))
            t, s = match_spatial(t, s)
            total = total + (at_least_float32(in_feature_precision(regressor, s)) - at_least_float32(t)).pow(2).mean()
        return total


class HardDarkRankLoss(nn.Module):
    """DarkRank (hard) on embeddings [N, D]: scores = -alpha * distance^beta; for each anchor the
    teacher's `permute_len` nearest other samples, in order, define a ranking, and
    loss = mean over anchors of -log P(ranking | student scores) under Plackett-Luce:
    -sum_i [s_i - log sum_{j >= i} exp(s_j)] over the ranked list."""

    def __init__(self, alpha: float = 2.0, beta: float = 3.0, permute_len: int = 4):
        super().__init__()
        self.alpha, self.beta, self.permute_len = alpha, beta, permute_len

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(len(student), dtype=torch.bool, device=student.device)
        score_t = (-self.alpha * pairwise_distance(teacher).pow(self.beta)).masked_fill(eye, -float("inf"))
        score_s = -self.alpha * pairwise_distance(student).pow(self.beta)
        ranking = score_t.topk(self.permute_len, dim=1).indices  # [N, k], best first, never self
        ordered = score_s.gather(1, ranking)
        # log of the sum of exp over each suffix ordered[:, i:], via a reversed cumulative logsumexp
        suffix_lse = ordered.flip(1).logcumsumexp(1).flip(1)
        return -(ordered - suffix_lse).sum(1).mean()


class RKDDistanceLoss(nn.Module):
    """RKD-D: pairwise distances [N, N] of each network, divided by their mean off-diagonal
    distance; smooth-L1 (mean over all N^2 entries) between student and teacher."""

    @staticmethod
    def normalised_distances(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distance(e)
        # the mean off the diagonal, which is exactly 0; a boolean-mask index would make the host
        # wait for the card (`nonzero`)
        n = len(e)
        return d / (d.sum() / (n * (n - 1)))

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.normalised_distances(teacher)
        return F.smooth_l1_loss(self.normalised_distances(student), target)


class RKDAngleLoss(nn.Module):
    """RKD-A: for every triple (i, j, k), cos of the angle at j between the unit vectors
    (e_i - e_j) and (e_k - e_j); smooth-L1 (mean over all N^3 triples) between student and teacher.
    A zero difference (i = j, or two equal embeddings) has no direction: its cosines are 0."""

    @staticmethod
    def angles(e: torch.Tensor) -> torch.Tensor:
        difference = e[None, :, :] - e[:, None, :]  # difference[j, i] = e_i - e_j
        norm = difference.norm(dim=2, keepdim=True)
        # A zero difference's cosines are constants, without gradient. Dividing by a small eps
        # instead (F.normalize) gives it cosines of 0 too, but a gradient 1/eps = 1e12 times the
        # loss's whenever the student holds two equal embeddings that the teacher does not.
        nonzero = norm > 0
        unit = torch.where(nonzero, difference / torch.where(nonzero, norm, 1.0), 0.0)
        return torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k]

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.angles(teacher)
        return F.smooth_l1_loss(self.angles(student), target)
