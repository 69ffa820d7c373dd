"""Chunked Recall@K and MAP@R against a brute-force computation on the full distance matrix."""
import numpy as np
import pytest
import torch

from aomd.metrics import map_at_r, r_precision, recall_at_k, retrieval_metrics


def brute_force(embeddings: np.ndarray, labels: np.ndarray, ks):
    """The definitions of docs/methods.md, section 6, on the full N x N matrix in float64."""
    dist = np.linalg.norm(embeddings[:, None, :] - embeddings[None, :, :], axis=2)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    relevant = labels[order] == labels[:, None]
    recall = {k: float(relevant[:, :k].any(1).mean()) for k in ks}
    aps, rps = [], []
    for i in range(len(labels)):
        r = int((labels == labels[i]).sum()) - 1
        if r == 0:
            continue
        rel = relevant[i, :r]
        precision = np.cumsum(rel) / np.arange(1, r + 1)
        aps.append((precision * rel).sum() / r)
        rps.append(rel.sum() / r)
    return recall, float(np.mean(aps)), float(np.mean(rps))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_metrics_equal_brute_force(chunk_size, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 9, 150)
    labels[:2] = [100, 101]  # two singleton classes: count for Recall, left out of MAP@R
    embeddings = rng.normal(size=(150, 16)) + labels[:, None] % 3  # some class structure
    ks = [1, 2, 4, 8, 16]
    expected_recall, expected_map, expected_rp = brute_force(embeddings, labels, ks)
    e, y = torch.tensor(embeddings, dtype=torch.float32), torch.tensor(labels)
    recall = recall_at_k(e, y, ks, chunk_size=chunk_size)
    assert recall.keys() == expected_recall.keys()
    for k in ks:
        assert recall[k] == pytest.approx(expected_recall[k], abs=1e-12)
    assert map_at_r(e, y, chunk_size=chunk_size) == pytest.approx(expected_map, rel=1e-6)
    assert r_precision(e, y, chunk_size=chunk_size) == pytest.approx(expected_rp, rel=1e-6)
    together = retrieval_metrics(e, y, ks, chunk_size=chunk_size)
    assert together == pytest.approx({**{f"recall@{k}": expected_recall[k] for k in ks},
                                      "map@r": expected_map, "r_precision": expected_rp}, rel=1e-6)


def test_perfect_and_hand_computed_values():
    # two tight clusters far apart: every neighbour within the class comes first
    e = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1]])
    y = torch.tensor([0, 0, 0, 1, 1])
    assert recall_at_k(e, y, [1, 2]) == {1: 1.0, 2: 1.0}
    assert map_at_r(e, y) == pytest.approx(1.0)
    # query 0's nearest is of another class, its second nearest of its own: R = 1 -> AP 0
    e = torch.tensor([[0.0], [0.5], [-1.0]])
    y = torch.tensor([0, 1, 0])
    # query 1 has no other image of its class: it never counts as found
    assert recall_at_k(e, y, [1, 2]) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert map_at_r(e, y) == pytest.approx(1 / 2)  # query 0: 0, query 2: 1, query 1: left out


def test_result_types():
    e, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    recall = recall_at_k(e, y, [1, 2])
    assert all(isinstance(k, int) and isinstance(v, float) and 0 <= v <= 1 for k, v in recall.items())
    assert isinstance(map_at_r(e, y), float)
    # labels as a user's code may hold them: a list, a NumPy array
    assert recall_at_k(e, y.tolist(), [1, 2]) == recall_at_k(e, y.numpy(), [1, 2]) == recall


def test_a_k_the_images_cannot_give_is_refused_in_one_sentence():
    embeddings, labels = torch.randn(16, 4), torch.arange(16) // 4
    with pytest.raises(ValueError, match=r"^Recall@32 of 16 images: K must be between 1 and 15 \(the other images of a query\)\.$"):
        recall_at_k(embeddings, labels, [1, 32])
    with pytest.raises(ValueError, match=r"^Retrieval needs at least 2 images, got 1\.$"):
        recall_at_k(embeddings[:1], labels[:1], [1])
