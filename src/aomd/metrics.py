"""Retrieval metrics on the test split: Recall@K, MAP@R and R-Precision (docs/methods.md, section 6).

Every test image is a query against all OTHER test images, ranked by Euclidean distance.
The metrics are computed in blocks of `chunk_size` queries against the whole gallery, keeping
only the nearest indices, so memory is O(chunk_size * N + N * K) and never N x N.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

DEFAULT_CHUNK = 1024


def _nearest(embeddings: torch.Tensor, k: int, chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """For each block of queries, the indices [chunk, k] of its k nearest other embeddings."""
    n = embeddings.shape[0]
    if not 0 < k < n:  # a public function: the caller's ks (or the largest class) against the images given
        raise ValueError(f"Recall@{k} of {n} images: K must be between 1 and {n - 1} (the other images of a query)."
                         if n > 1 else f"Retrieval needs at least 2 images, got {n}.")
    embeddings = embeddings.float()
    for start in range(0, n, chunk_size):
        block = slice(start, min(start + chunk_size, n))
        dist = torch.cdist(embeddings[block], embeddings)
        rows = torch.arange(dist.shape[0], device=dist.device)
        dist[rows, rows + start] = float("inf")  # a query never retrieves itself
        yield block, dist.topk(k, dim=1, largest=False).indices


def _evaluate(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int], with_r: bool,
              chunk_size: int) -> tuple[dict[int, float], float, float]:
    """One chunked pass: (Recall@K for each K, MAP@R, R-Precision); the last two only `with_r`."""
    device = embeddings.device
    ks = sorted(set(int(k) for k in ks))
    labels = torch.as_tensor(labels, device=device)  # a tensor, or a list or array of labels from a user's code
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r_of_query = counts[inverse] - 1  # [N]: the other images of each query's class
    has_r = r_of_query > 0
    depth = max(ks[-1], int(r_of_query.max())) if with_r else ks[-1]
    ranks = torch.arange(1, depth + 1, device=device)
    hits = torch.zeros(len(ks), device=device)
    ap_sum = rp_sum = torch.zeros((), dtype=torch.float64, device=device)
    for block, nearest in _nearest(embeddings, depth, chunk_size):
        relevant = labels[nearest] == labels[block, None]  # [chunk, depth]
        found = relevant[:, : ks[-1]]
        first_hit = torch.where(found.any(1), found.float().argmax(1), ks[-1])  # rank of the first hit
        hits += torch.stack([(first_hit < k).sum() for k in ks]).float()
        if with_r:
            r = r_of_query[block]
            relevant_in_r = relevant & (ranks[None, :] <= r[:, None])
            precision = relevant_in_r.cumsum(1).double() / ranks
            valid = has_r[block]
            ap_sum = ap_sum + ((precision * relevant_in_r).sum(1) / r.clamp(min=1))[valid].sum()
            rp_sum = rp_sum + (relevant_in_r.sum(1).double() / r.clamp(min=1))[valid].sum()
    recall = {k: float(h) / len(labels) for k, h in zip(ks, hits.tolist())}
    queries_with_r = max(int(has_r.sum()), 1)
    return recall, float(ap_sum) / queries_with_r, float(rp_sum) / queries_with_r


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int],
                chunk_size: int = DEFAULT_CHUNK) -> dict[int, float]:
    """Recall@K for each K in `ks`.

    embeddings: [N, D]; labels: [N]. Recall@K = fraction of queries with at least one
    same-class image among their K nearest other images. Returns {K: value in [0, 1]}.
    """
    return _evaluate(embeddings, labels, ks, False, chunk_size)[0]


def map_at_r(embeddings: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> float:
    """MAP@R (Musgrave et al., 2020), a float in [0, 1].

    For a query with R other images of its class: MAP@R = (1/R) * sum_{i<=R} P(i) * rel(i), where
    rel(i) says whether the i-th nearest is of the query's class and P(i) is the precision of the
    first i. Averaged over queries; queries alone in their class (R = 0) are left out.
    """
    return _evaluate(embeddings, labels, [1], True, chunk_size)[1]


def r_precision(embeddings: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> float:
    """R-Precision: the fraction of a query's R nearest that are of its class, averaged over
    queries with R > 0 (Musgrave et al., 2020)."""
    return _evaluate(embeddings, labels, [1], True, chunk_size)[2]


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int],
                      chunk_size: int = DEFAULT_CHUNK) -> dict[str, float]:
    """{"recall@K": ..., "map@r": ..., "r_precision": ...} from a single ranking pass."""
    recall, map_r, r_prec = _evaluate(embeddings, labels, ks, True, chunk_size)
    return {**{f"recall@{k}": v for k, v in recall.items()}, "map@r": map_r, "r_precision": r_prec}


SELECTIONS = ("test", "last", "val")


def selection_metric(recall_k: Sequence[int], select: str = "test") -> str:
    """The metric that selects the epoch and that a job returns: Recall@K at the smallest K, of
    the validation split with `select="val"` ("val/recall@K"), else of the test split."""
    assert select in SELECTIONS, select
    return f"{'val/' if select == 'val' else ''}recall@{min(recall_k)}"
