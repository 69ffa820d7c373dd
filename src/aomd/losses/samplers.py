"""The five negative samplers of docs/methods.md, section 2, vectorised over the batch.

A sampler takes embeddings [N, D] and labels [N] and returns three index tensors
(anchors, positives, negatives) of equal length T, one entry per triplet, on the embeddings'
device. Anchor-positive pairs are every ordered pair (a, p) with y_a = y_p and a != p (those of an
anchor without any negative are dropped); the sampler chooses negatives n (y_n != y_a) for them.
Distances are L2, for the L1 triplet loss too (as the reference's samplers), and computed without
gradient.

Nothing here waits for an accelerator: the pairs depend on the labels alone and are found where the
labels are (the training step keeps them on the host, `aomd.data.loader.to_device`), and the
negatives are drawn without reading anything back. Finding pairs with `nonzero` on a card, or a
masked assignment there, stops the host until the card has run the whole step so far, and leaves
the card idle while the host launches what follows.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from aomd.runtime import from_host

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def labelled_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors [P], positives [P], negative_mask [N, N]) of labels [N], on the labels' device:
    every ordered pair (a, p) with y_a = y_p and a != p whose anchor has a negative, and
    negative_mask[a, n] = (y_n != y_a)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative_mask = ~same
    anchors, positives = (same & ~eye & negative_mask.any(1, keepdim=True)).nonzero(as_tuple=True)
    return anchors, positives, negative_mask


class NegativeSampler(nn.Module, abc.ABC):
    """Base class: finds the anchor-positive pairs, subclasses choose negatives."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        """Triplets for a batch, chosen by L2 distances whatever distance the loss uses (the L1
        triplet too, as the reference's samplers). The labels may be on the host while the
        embeddings are on a card."""
        with torch.no_grad():
            pairs = from_host(embeddings.device, *labelled_pairs(labels))
            dist = torch.cdist(embeddings.detach().float(), embeddings.detach().float())
            return self.choose(dist, *pairs, embeddings.shape[1])

    @abc.abstractmethod
    def choose(self, dist: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor,
               negative_mask: torch.Tensor, dim: int) -> Triplets:
        """Negatives for the pairs (anchors[i], positives[i]), given distances [N, N], the
        negative mask [N, N] and the embedding size `dim`; every anchor has a negative."""


def _one_per_pair(weights: torch.Tensor, anchors, positives) -> Triplets:
    """Draw one negative per pair from per-pair weights [P, N] (finite, >= 0, rows with a
    positive sum): what `torch.multinomial(weights, 1)` draws (the same exponential draws from the
    same generator, so the same negatives), without its check of the weights (a read back from the
    device in PyTorch before about 2.5, an asynchronous device assertion since), which the
    samplers' weights never fail."""
    exponential = torch.empty_like(weights).exponential_(1)
    return anchors, positives, (weights / exponential).argmax(1)


class RandomNegatives(NegativeSampler):
    """One uniformly random negative per anchor-positive pair."""

    def choose(self, dist, anchors, positives, negative_mask, dim) -> Triplets:
        return _one_per_pair(negative_mask[anchors].float(), anchors, positives)


class HardNegatives(NegativeSampler):
    """The closest negative of the anchor."""

    def choose(self, dist, anchors, positives, negative_mask, dim) -> Triplets:
        negative_dist = dist.masked_fill(~negative_mask, math.inf)
        return anchors, positives, negative_dist.argmin(1)[anchors]


class SemiHardNegatives(NegativeSampler):
    """The closest negative farther than the positive; if there is none, the farthest negative."""

    def choose(self, dist, anchors, positives, negative_mask, dim) -> Triplets:
        row = dist[anchors]  # [P, N]
        is_negative = negative_mask[anchors]
        semihard = is_negative & (row > dist[anchors, positives][:, None])
        closest_semihard = row.masked_fill(~semihard, math.inf).argmin(1)
        farthest = row.masked_fill(~is_negative, -math.inf).argmax(1)
        return anchors, positives, torch.where(semihard.any(1), closest_semihard, farthest)


class DistanceWeightedNegatives(NegativeSampler):
    """Distance-weighted sampling (Wu et al., 2017), on an l2-normalised copy of the embeddings.

    With s the anchor-negative distance clipped below at `cutoff` and d the embedding size,
    weight(n) ~ s^(2-d) * (1 - s^2/4)^((3-d)/2), i.e. the inverse of the density of distances
    between points uniform on the unit sphere; zero where s >= `nonzero_loss_cutoff`. Computed in
    log space in float32 and normalised per anchor by the maximum of log w over the anchor's whole
    row, positives included (the anchor itself at distance 1), as the reference does: where a
    positive is much closer than every negative, every negative's weight underflows to 0. An
    anchor with no weight left samples uniformly among its negatives.
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4):
        super().__init__()
        self.cutoff = cutoff
        self.nonzero_loss_cutoff = nonzero_loss_cutoff

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        # the weights are defined for distances between points on the unit sphere, whether the
        # network l2-normalises or not (RKD's students do not): off the sphere, every distance
        # would pass nonzero_loss_cutoff and the draws fall back to uniform
        return super().forward(F.normalize(embeddings.detach().float(), dim=1), labels)

    def weights(self, dist: torch.Tensor, negative_mask: torch.Tensor, dim: int) -> torch.Tensor:
        """Sampling probabilities [N, N] of each negative (columns) for each anchor (rows); the row of
        an anchor with a negative in the batch sums to 1, the others are 0."""
        dist = dist.float()  # which weights underflow is part of the recipe: float32's, as the reference's
        itself = torch.eye(len(dist), dtype=torch.bool, device=dist.device)
        s = dist.masked_fill(itself, 1.0).clamp(min=self.cutoff, max=1.999)  # max: log(1 - s^2/4) stays finite
        log_w = (2.0 - dim) * s.log() + ((3.0 - dim) / 2.0) * (1.0 - s.pow(2) / 4.0).log()
        # The row maximum is taken before the mask, over positives too, as in the reference: an
        # anchor whose positive is far closer than its nearest negative has no weight left, in
        # float32, and samples uniformly. A maximum over the allowed negatives alone would give
        # that anchor its nearest negative, nearly always at 512-d: hard-negative mining for the
        # teacher, where the reference draws uniformly.
        weights = (log_w - log_w.max(1, keepdim=True).values).exp()
        weights = weights * (negative_mask & (dist < self.nonzero_loss_cutoff))
        empty = weights.sum(1, keepdim=True) == 0
        weights = torch.where(empty, negative_mask.float(), weights)  # no weight left: uniform over negatives
        # The weights left may all be subnormal (every negative far beyond a positive, as at 128-d
        # with tight clusters): their sum is then below any fixed clamp. Scaling each row to a
        # maximum of 1 first makes every sum at least 1; the draws do not depend on a row's scale.
        tiny = torch.finfo(weights.dtype).tiny  # rows without a negative stay 0, not 0/0
        weights = weights / weights.amax(1, keepdim=True).clamp(min=tiny)
        return weights / weights.sum(1, keepdim=True).clamp(min=tiny)

    def choose(self, dist, anchors, positives, negative_mask, dim) -> Triplets:
        return _one_per_pair(self.weights(dist, negative_mask, dim)[anchors], anchors, positives)


class AllNegatives(NegativeSampler):
    """Every (anchor, positive, negative) combination: the labels alone decide them, so they are
    found where the labels are, and no distance is computed."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Triplets:
        with torch.no_grad():
            return from_host(embeddings.device, *self.choose(None, *labelled_pairs(labels), embeddings.shape[1]))

    def choose(self, dist, anchors, positives, negative_mask, dim) -> Triplets:
        pair, negatives = negative_mask[anchors].nonzero(as_tuple=True)
        return anchors[pair], positives[pair], negatives
