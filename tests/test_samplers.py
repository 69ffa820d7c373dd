"""The five negative samplers on hand-built batches (docs/methods.md, section 2) and the triplet losses."""
import math

import numpy as np
import pytest
import torch

from aomd.losses import (
    AllNegatives,
    ContrastiveLoss,
    DistanceWeightedNegatives,
    HardNegatives,
    RandomNegatives,
    SemiHardNegatives,
    TripletLoss,
)

# points on a line; classes 0, 0, 1, 1, 2
LINE = torch.tensor([[0.0], [1.0], [0.3], [5.0], [-2.0]])
LABELS = torch.tensor([0, 0, 1, 1, 2])
PAIRS = {(0, 1), (1, 0), (2, 3), (3, 2)}


def triplets(sampler, embeddings=LINE, labels=LABELS):
    a, p, n = sampler(embeddings, labels)
    return sorted(zip(a.tolist(), p.tolist(), n.tolist()))


def test_all_gives_every_combination():
    expected = sorted((a, p, n) for a, p in PAIRS for n in range(5) if LABELS[n] != LABELS[a])
    assert triplets(AllNegatives()) == expected
    assert len(expected) == 12


def test_hard_takes_the_closest_negative_of_the_anchor():
    assert triplets(HardNegatives()) == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1)]


def test_the_l1_triplet_mines_by_l2_distances_as_the_reference():
    # from the anchor (0, 0): negative 2 is nearer in L2 (1.41 < 1.9), negative 3 in L1 (1.9 < 2)
    e = torch.tensor([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [1.9, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    chosen = []
    sampler = HardNegatives()
    sampler.register_forward_hook(lambda module, args, triplets: chosen.append(triplets))
    TripletLoss(sampler, margin=0.2, p=1)(e, labels)  # the loss's distance is L1, its triplets' L2
    a, p, n = (t.tolist() for t in chosen[0])
    assert dict(zip(zip(a, p), n)) == {(0, 1): 2, (1, 0): 2}


def test_semihard_takes_the_closest_negative_beyond_the_positive_else_the_farthest():
    # (0,1): d_ap 1, negatives at 0.3 (2), 5 (3), 2 (4) -> 4;  (1,0): 0.7, 4, 3 -> 4
    # (2,3): d_ap 4.7, negatives at 0.3, 0.7, 2.3: none beyond -> farthest, 4
    # (3,2): d_ap 4.7, negatives at 5 (0), 4 (1), 7 (4) -> 0
    assert triplets(SemiHardNegatives()) == [(0, 1, 4), (1, 0, 4), (2, 3, 4), (3, 2, 0)]


def test_semihard_does_not_take_a_negative_exactly_as_far_as_the_positive():
    # (0,1): d_ap 1; negative 2 at exactly 1 is not beyond it, negative 3 at 3 is (collapsed
    # embeddings, all at one point, are the extreme of such ties)
    e, labels = torch.tensor([[0.0], [1.0], [-1.0], [3.0]]), torch.tensor([0, 0, 1, 2])
    assert dict(((a, p), n) for a, p, n in triplets(SemiHardNegatives(), e, labels))[(0, 1)] == 3


def test_random_is_one_uniform_negative_per_pair():
    torch.manual_seed(0)
    counts = np.zeros((5, 5))
    for _ in range(600):
        found = triplets(RandomNegatives())
        assert {(a, p) for a, p, _ in found} == PAIRS and len(found) == 4
        for a, _, n in found:
            assert LABELS[n] != LABELS[a]
            counts[a, n] += 1
    # each anchor has 3 negatives: each drawn about 1/3 of the time (600 draws per anchor)
    for a in range(4):
        negatives = [n for n in range(5) if LABELS[n] != LABELS[a]]
        assert np.allclose(counts[a, negatives] / 600, 1 / 3, atol=0.07)


def test_distance_weighted_weights_follow_the_formula():
    torch.manual_seed(0)
    dim = 8
    e = torch.nn.functional.normalize(torch.randn(12, dim), dim=1)
    labels = torch.arange(12) // 3
    dist = torch.cdist(e, e)
    negative = labels[:, None] != labels[None, :]
    sampler = DistanceWeightedNegatives(cutoff=0.5, nonzero_loss_cutoff=1.4)
    weights = sampler.weights(dist, negative, dim).numpy()
    d = dist.double().numpy()
    for a in range(12):
        s = np.clip(d[a], 0.5, None)
        w = s ** (2 - dim) * (1 - s**2 / 4) ** ((3 - dim) / 2)
        w[~negative[a].numpy() | (d[a] >= 1.4)] = 0
        expected = w / w.sum() if w.sum() > 0 else negative[a].numpy() / negative[a].sum().item()
        assert np.allclose(weights[a], expected, rtol=1e-4, atol=1e-9)


def test_distance_weighted_falls_back_to_uniform_when_every_negative_is_far():
    # two antipodal classes: every negative at distance 2 >= 1.4 gets no weight -> uniform
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    weights = DistanceWeightedNegatives().weights(torch.cdist(e, e), labels[:, None] != labels[None, :], 2)
    assert torch.allclose(weights, torch.tensor([[0, 0, 0.5, 0.5]] * 2 + [[0.5, 0.5, 0, 0]] * 2))
    a, p, n = DistanceWeightedNegatives()(e, labels)
    assert len(a) == 4 and all(labels[n] != labels[a])


def test_distance_weighted_weights_underflow_as_the_reference_where_a_positive_is_far_closer():
    """The row maximum of log w covers the anchor's positives (and itself, at distance 1): at
    512-d, a positive at 0.5 and negatives beyond about 0.63 leave no negative any weight in
    float32, so the anchor draws uniformly among all its negatives, as the reference's sampler
    does; where the distances overlap the weights follow the formula."""
    dim = 512
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    negative = labels[:, None] != labels[None, :]
    dist = torch.full((6, 6), 0.9)
    dist.fill_diagonal_(0.0)
    dist[0, 1] = dist[1, 0] = 0.5            # class 0: its two images close together
    dist[0, 2:] = dist[2:, 0] = torch.tensor([0.7, 0.8, 1.45, 1.2])  # every negative of image 0 far beyond its positive
    dist[2, 3] = dist[3, 2] = 0.88             # class 1: positive and negatives overlap (image 2's nearest: image 0)
    weights = DistanceWeightedNegatives().weights(dist, negative, dim)

    def reference(row: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:  # float32, as the reference computes
        s = row.clamp(min=0.5)
        log_w = (2.0 - dim) * s.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * s * s).log()
        w = (log_w - log_w.max()).exp() * allowed
        return w / w.sum() if w.sum() > 0 else allowed.float() / allowed.sum()

    assert torch.equal(weights[0], torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25]))  # uniform, the one >= 1.4 included
    for a in range(1, 6):
        row = dist[a].clone()
        row[a] = 1.0
        expected = reference(row, negative[a] & (dist[a] < 1.4))
        if expected.sum() == 0:
            expected = negative[a].float() / negative[a].sum()
        assert torch.allclose(weights[a], expected, atol=1e-6), (a, weights[a], expected)
    assert weights[2, 0] > 0.99  # overlapping distances: at 512-d the nearest negative (0.7) takes nearly all


def test_distance_weighted_weights_sum_to_one_when_all_are_subnormal():
    """Tight 128-d clusters: every negative is far beyond the anchor's positives, so the weights
    left are subnormal floats (their sums about 1e-38); each anchor's row still sums to 1."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 128, generator=g)
    labels = torch.arange(64) // 8
    e = torch.nn.functional.normalize(centres[labels] + 0.02 * torch.randn(64, 128, generator=g), dim=1)
    dist, negative = torch.cdist(e, e), labels[:, None] != labels[None, :]
    weights = DistanceWeightedNegatives().weights(dist, negative, 128)
    s = dist.masked_fill(torch.eye(64, dtype=torch.bool), 1.0).clamp(0.5, 1.999)
    log_w = -126 * s.log() - 62.5 * (1 - s.pow(2) / 4).log()
    raw = (log_w - log_w.max(1, keepdim=True).values).exp() * (negative & (dist < 1.4))
    assert (raw.sum(1) > 0).all() and (raw.sum(1) < 1e-30).all()  # the case: no row empty, every sum tiny
    torch.testing.assert_close(weights.sum(1), torch.ones(64))
    assert (weights[~negative] == 0).all()
    # a batch of one class: no anchor has a negative, every row is 0 (not 0/0)
    alone = DistanceWeightedNegatives().weights(dist[:8, :8], negative[:8, :8], 128)
    assert torch.equal(alone, torch.zeros(8, 8))

def test_distance_weighted_draws_follow_the_weights():
    torch.manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    sampler = DistanceWeightedNegatives()
    expected = sampler.weights(torch.cdist(e, e), labels[:, None] != labels[None, :], 4)
    counts = torch.zeros(8, 8)
    for _ in range(1500):
        a, _, n = sampler(e, labels)
        counts.index_put_((a, n), torch.ones(len(a)), accumulate=True)
    # each anchor is in one pair per batch -> 1500 draws per anchor
    assert torch.allclose(counts / 1500, expected, atol=0.05)


def test_distance_weighted_draws_the_same_from_embeddings_off_the_unit_sphere():
    """A network without l2 normalisation (RKD's students) with a triplet term: the weights are
    those of the normalised embeddings, not uniform (every raw distance would pass the cutoff)."""
    e = torch.nn.functional.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    labels = torch.arange(16) // 4
    draws = []
    for scale in (1.0, 5.0):
        torch.manual_seed(3)
        draws.append(torch.stack([DistanceWeightedNegatives()(scale * e, labels)[2] for _ in range(20)]))
    assert torch.equal(draws[0], draws[1])


def test_random_draws_are_those_of_torch_multinomial():
    """The draws skip `torch.multinomial`'s check of the weights but stay its draws: a run's
    negatives, and so its results, are those of earlier versions."""
    from aomd.losses.samplers import _one_per_pair

    weights = torch.rand(40, 16) * (torch.rand(40, 16) > 0.4)
    weights[:, 0] += 0.01  # every row has weight
    anchors = torch.arange(40)
    torch.manual_seed(7)
    expected = torch.multinomial(weights, 1).squeeze(1)
    torch.manual_seed(7)
    assert torch.equal(_one_per_pair(weights, anchors, anchors)[2], expected)


def test_pairs_of_anchors_without_a_negative_are_dropped_by_every_sampler():
    labels = torch.tensor([0, 0, 0, 0])  # one class: no negative anywhere
    for sampler in (AllNegatives(), RandomNegatives(), HardNegatives(), SemiHardNegatives(), DistanceWeightedNegatives()):
        assert [len(t) for t in sampler(torch.nn.functional.normalize(torch.randn(4, 3), dim=1), labels)] == [0, 0, 0]


def test_triplet_losses_match_their_formula():
    # points in the plane: on a line, L1 and L2 distances are equal and could not tell the two apart
    torch.manual_seed(0)
    points = torch.randn(len(LABELS), 2)
    a, p, n = AllNegatives()(points, LABELS)
    losses = {}
    for p_norm in (1, 2):
        d_ap = (points[a] - points[p]).norm(p=p_norm, dim=1)
        d_an = (points[a] - points[n]).norm(p=p_norm, dim=1)
        expected = (d_ap - d_an + 0.3).clamp(min=0).mean()
        losses[p_norm] = TripletLoss(AllNegatives(), 0.3, p_norm)(points, LABELS).item()
        assert losses[p_norm] == pytest.approx(expected.item())
    assert abs(losses[1] - losses[2]) > 0.01
    d_ap, d_an = (LINE[a] - LINE[p]).norm(dim=1), (LINE[a] - LINE[n]).norm(dim=1)
    expected = torch.cat([d_ap.pow(2), (0.5 - d_an).clamp(min=0).pow(2)]).mean()
    assert ContrastiveLoss(AllNegatives(), 0.5)(LINE, LABELS).item() == pytest.approx(expected.item())


def test_a_batch_without_positive_pairs_gives_zero_loss_with_a_gradient():
    e = torch.randn(4, 3, requires_grad=True)
    loss = TripletLoss(DistanceWeightedNegatives())(e, torch.arange(4))
    assert loss.item() == 0 and loss.requires_grad
    assert not math.isnan(loss.item())
