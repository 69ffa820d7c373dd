"""Retrieval metrics on the test split: Recall@K and MAP@R (METHODS.md section 5).

Every test image is a query against all OTHER test images, ranked by Euclidean distance.
Both metrics are computed in blocks of `chunk_size` queries against the whole gallery, keeping
only the nearest indices, so memory is O(chunk_size * N + N * K) and never N x N.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

DEFAULT_CHUNK = 1024


def _nearest(embeddings: torch.Tensor, k: int, chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """For each block of queries, the indices [chunk, k] of its k nearest other embeddings."""
    n = embeddings.shape[0]
    assert 0 < k < n, "k must leave at least one other image"
    embeddings = embeddings.float()
    for start in range(0, n, chunk_size):
        block = slice(start, min(start + chunk_size, n))
        dist = torch.cdist(embeddings[block], embeddings)
        rows = torch.arange(dist.shape[0], device=dist.device)
        dist[rows, rows + start] = float("inf")  # a query never retrieves itself
        yield block, dist.topk(k, dim=1, largest=False).indices


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int],
                chunk_size: int = DEFAULT_CHUNK) -> dict[int, float]:
    """Recall@K for each K in `ks`.

    embeddings: [N, D]; labels: [N]. Recall@K = fraction of queries with at least one
    same-class image among their K nearest other images. Returns {K: value in [0, 1]}.
    """
    ks = sorted(set(int(k) for k in ks))
    labels = labels.to(embeddings.device)
    hits = torch.zeros(len(ks), device=embeddings.device)
    for block, nearest in _nearest(embeddings, ks[-1], chunk_size):
        relevant = labels[nearest] == labels[block, None]  # [chunk, kmax]
        first_hit = torch.where(relevant.any(1), relevant.float().argmax(1), ks[-1])  # rank of first hit
        hits += torch.stack([(first_hit < k).sum() for k in ks]).float()
    return {k: float(h) / len(labels) for k, h in zip(ks, hits.tolist())}


def map_at_r(embeddings: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> float:
    """MAP@R (Musgrave et al., 2020), a float in [0, 1].

    For a query with R other images of its class: MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i), where
    rel(i) says whether the i-th nearest is of the query's class and P(i) is the precision of the
    first i. Averaged over queries; queries alone in their class (R = 0) are left out.
    """
    labels = labels.to(embeddings.device)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r_of_query = counts[inverse] - 1  # [N]
    valid = r_of_query > 0
    if not bool(valid.any()):
        return 0.0
    r_max = int(r_of_query.max())
    total = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    for block, nearest in _nearest(embeddings, r_max, chunk_size):
        r = r_of_query[block]
        ranks = torch.arange(1, r_max + 1, device=embeddings.device)
        within_r = ranks[None, :] <= r[:, None]
        relevant = (labels[nearest] == labels[block, None]) & within_r
        precision = relevant.cumsum(1).double() / ranks
        ap = (precision * relevant).sum(1) / r.clamp(min=1)
        total += ap[valid[block]].sum()
    return float(total) / int(valid.sum())
