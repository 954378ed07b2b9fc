import numpy as np
import pytest

from otclip.engine.metrics import (
    first_relevant_rank,
    harmonic_mean,
    recall_at_k,
    relevance_from_ids,
    zero_shot_accuracy,
)


def worst_case_rank(s, r) -> int:
    """Sort the items, ties broken worst case (non-relevant before relevant), and find the first relevant."""
    order = sorted(range(len(s)), key=lambda j: (-s[j], bool(r[j])))
    return next(pos for pos, j in enumerate(order, 1) if r[j])


def brute_force_recall(scores, relevant, k):
    return sum(worst_case_rank(s, r) <= k for s, r in zip(scores, relevant)) / len(scores)


def test_relevant_items_tied_at_the_top_rank_first():
    scores = np.array([[0.9, 0.9, 0.1], [0.5, 0.5, 0.5]])
    relevant = np.array([[True, True, False], [True, False, True]])
    np.testing.assert_array_equal(first_relevant_rank(scores, relevant), [1, 2])


def test_ranks_match_a_worst_case_sort_on_random_ties():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 4, size=(3000, 12)).astype(float)  # few distinct values: ties everywhere
    relevant = rng.random((3000, 12)) < 0.25
    relevant[:, 0] |= ~relevant.any(1)
    expected = [worst_case_rank(s, r) for s, r in zip(scores, relevant)]
    np.testing.assert_array_equal(first_relevant_rank(scores, relevant), expected)


def test_hand_computed_single_positive():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    relevant = np.eye(3, dtype=bool)
    # ranks: q0 -> item0 first (1); q1 -> item1 behind item2 (2); q2 -> item2 last (3)
    np.testing.assert_array_equal(first_relevant_rank(scores, relevant), [1, 2, 3])
    r = recall_at_k(scores, relevant, ks=(1, 2, 10))
    assert r["R@1"] == pytest.approx(1 / 3)
    assert r["R@2"] == pytest.approx(2 / 3)
    assert r["R@10"] == 1.0  # k larger than the corpus
    assert r["mean_rank"] == pytest.approx(2.0)
    assert r["median_rank"] == 2.0


def test_several_positives_take_the_best_ranked():
    scores = np.array([[0.1, 0.9, 0.8, 0.2]])
    relevant = np.array([[True, False, True, False]])
    assert first_relevant_rank(scores, relevant)[0] == 2


def test_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.5]])
    relevant = np.array([[False, True, False]])
    assert first_relevant_rank(scores, relevant)[0] == 3


def test_query_without_relevant_item_never_hits():
    scores = np.array([[0.5, 0.4], [0.1, 0.2]])
    relevant = np.array([[False, False], [False, True]])
    r = recall_at_k(scores, relevant, ks=(1,))
    assert r["R@1"] == 0.5


def test_matches_brute_force_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = rng.integers(2, 15, size=2)
        scores = np.round(rng.normal(size=(n, m)), 1)  # rounding makes ties common
        ids_q, ids_i = rng.integers(0, 4, size=n), rng.integers(0, 4, size=m)
        relevant = relevance_from_ids(ids_q, ids_i)
        keep = relevant.any(axis=1)
        scores, relevant = scores[keep], relevant[keep]
        if not len(scores):
            continue
        for k in (1, 3, 5):
            assert recall_at_k(scores, relevant, ks=(k,))[f"R@{k}"] == pytest.approx(
                brute_force_recall(scores, relevant, k)
            )


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        first_relevant_rank(np.zeros((2, 3)), np.zeros((3, 2), bool))


def test_zero_shot_accuracy_and_harmonic_mean():
    classes = np.eye(3)
    images = np.array([[1, 0, 0], [0, 0.9, 0.1], [0.6, 0.4, 0]])
    assert zero_shot_accuracy(images, classes, [0, 1, 2]) == pytest.approx(2 / 3)
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.0, 1.0) == 0.0
