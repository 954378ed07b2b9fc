"""Retrieval metrics, pure NumPy so they can be checked against brute force and hand-computed cases.

Convention: `scores` is (n_queries, n_items); `relevant` is a boolean (n_queries, n_items) matrix
(several relevant items per query are allowed). A query hits at k when any relevant item ranks
in its top k. Ties are broken pessimistically: a non-relevant item tied with a relevant one ranks
before it (relevant items tied with each other do not push each other down).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(n_queries,) 1-based rank of the best-ranked relevant item (inf when a query has none).

    rank = 1 + #{non-relevant items scoring at least as high as the best relevant item}: the rank of
    the first relevant item when ties are ordered worst case (non-relevant first).
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} differ in shape")
    best_relevant = np.where(relevant, scores, -np.inf).max(axis=1, initial=-np.inf)
    ahead = ((scores >= best_relevant[:, None]) & ~relevant).sum(axis=1)
    ranks = 1.0 + ahead
    ranks[~relevant.any(axis=1)] = np.inf
    return ranks


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"R@k": fraction of queries with a relevant item in the top k}, plus mean and median rank."""
    return recall_from_ranks(first_relevant_rank(scores, relevant), ks)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall_at_k` from each query's first relevant rank (inf: none found, a miss at every k, left out of the
    mean and median rank)."""
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    finite = ranks[np.isfinite(ranks)]
    out["mean_rank"] = float(finite.mean()) if finite.size else float("nan")
    out["median_rank"] = float(np.median(finite)) if finite.size else float("nan")
    return out


def relevance_from_ids(query_ids: Sequence, item_ids: Sequence) -> np.ndarray:
    """Boolean (n_queries, n_items) matrix: relevant where the ids (pair id or label) are equal."""
    return np.asarray(query_ids)[:, None] == np.asarray(item_ids)[None, :]


def zero_shot_accuracy(image_embeddings: np.ndarray, class_embeddings: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 accuracy of classifying each image by its most similar class prompt embedding."""
    predictions = np.argmax(image_embeddings @ class_embeddings.T, axis=1)
    return float(np.mean(predictions == np.asarray(labels)))


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
