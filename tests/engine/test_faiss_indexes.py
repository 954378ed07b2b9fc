import faiss
import numpy as np
import pytest

from otclip.engine.faiss_indexes import (
    auto_factory,
    best_k,
    build_index,
    estimated_bytes,
    load_index,
    probe_search,
    rerank_factor,
    save_index,
)


def clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, d))[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_auto_factory_grows_with_the_collection():
    assert auto_factory(1000, 384) == "Flat"
    assert auto_factory(100_000, 384).startswith("IVF") and auto_factory(100_000, 384).endswith(",Flat")
    assert auto_factory(5_000_000, 384) == "IVF8192,SQ8"  # 4 sqrt(5M) = 8944 -> 2^13 lists, 1 byte a dimension


def test_a_memory_budget_picks_the_most_accurate_index_that_fits():
    """Hand-computed at 1M x 384-d (4096 lists: 6.29 MB of centroids): IVF-Flat 1M x (1536 + 8) B = 1.55 GB;
    SQ8 1M x (384 + 8) B = 398 MB; OPQ96/PQ96 1M x (96 + 8) B + centroids + codebooks 256 x 384 x 4 B
    + rotation 384^2 x 4 B = 111.3 MB; PQ64 79.3 MB; PQ8 23.3 MB."""
    n, d = 1_000_000, 384
    assert auto_factory(n, d, 2 * 10**9) == "IVF4096,Flat"
    assert auto_factory(n, d, 10**9) == "IVF4096,SQ8"
    assert auto_factory(n, d, 120 * 10**6) == "OPQ96,IVF4096,PQ96"
    assert auto_factory(n, d, 100 * 10**6) == "OPQ64,IVF4096,PQ64"
    assert auto_factory(n, d, 24 * 10**6) == "OPQ8,IVF4096,PQ8"
    with pytest.raises(ValueError, match="no index of 1000000 vectors of 384 dimensions fits; the smallest, "
                                         "OPQ8,IVF4096,PQ8, takes 23.3 MB"):
        auto_factory(n, d, 20 * 10**6)
    assert auto_factory(1000, 384, 10**9) == "Flat"


@pytest.mark.parametrize("factory, rerank", [("Flat", 1), ("IVF64,Flat", 1), ("IVF64,SQ8", 4), ("OPQ4,IVF64,PQ4", 40)])
def test_estimated_bytes_are_the_built_index_size(factory, rerank):
    """The estimate against FAISS's own serialisation of the built index (within 2%: list headers aside); and
    how many candidates a search re-ranks: none for full vectors, 4x for 1 byte a dimension, 40x for PQ."""
    n = 3000 if factory.startswith("OPQ") else 10_000  # OPQ trains slowly
    index, _ = build_index(clustered(n), factory)
    actual = faiss.serialize_index(index).nbytes
    assert abs(estimated_bytes(factory, n, 32) - actual) <= 0.02 * actual, (estimated_bytes(factory, n, 32), actual)
    assert rerank_factor(index) == rerank


def test_exact_index_equals_brute_force(tmp_path):
    x, q = clustered(2000), clustered(20, seed=1)
    index, used = build_index(x, "auto")
    assert used == "Flat"
    path = save_index(index, tmp_path / "i.faiss")
    scores, ids = load_index(path, use_gpu=False).search(q, 10)
    expected = np.argsort(-(q @ x.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, expected, axis=1), rtol=1e-5)


def test_ivf_recall_against_exact_is_reported():
    x, q = clustered(20_000), clustered(200, seed=2)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    index, used = build_index(x, "IVF128,Flat")
    _, found = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    print(f"IVF128,Flat (nprobe {faiss.extract_index_ivf(index).nprobe}) recall@10 against exact: {recall:.3f}")
    assert recall >= 0.9


def test_bad_factory_and_too_few_vectors_are_explained():
    with pytest.raises(ValueError, match="not a valid FAISS index description"):
        build_index(clustered(10), "Nonsense42")
    with pytest.raises(ValueError, match="needs at least 64 vectors"):
        build_index(clustered(10), "IVF64,Flat")


def test_untrained_non_ivf_index_with_no_vectors_is_explained():
    with pytest.raises(ValueError, match="needs at least 1 vectors"):
        build_index(np.zeros((0, 32), np.float32), "PQ8")


def test_best_k_breaks_ties_to_the_lower_position():
    """By hand: three scores tie at 0.9; the two lowest positions among them win, best first."""
    scores = np.array([0.5, 0.9, 0.9, 0.1, 0.9], np.float32)
    got = best_k(scores, np.array([10, 4, 2, 7, 3]), 2)
    assert got[0].tolist() == pytest.approx([0.9, 0.9]) and got[1].tolist() == [2, 3]
    assert best_k(scores, np.arange(5), 0)[1].tolist() == [] and best_k(scores, np.arange(5), 9)[1].tolist() == [1, 2, 4, 0, 3]


def test_best_k_equals_a_full_sort():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 50, 2000).astype(np.float32)  # many ties
    positions = rng.permutation(10_000)[:2000]
    order = sorted(range(2000), key=lambda i: (-scores[i], positions[i]))[:37]
    got_scores, got_positions = best_k(scores, positions, 37)
    assert got_positions.tolist() == positions[order].tolist() and got_scores.tolist() == scores[order].tolist()


def test_probe_search_scans_fewer_lists_than_a_search():
    """An IVF probe scans PROBE_NPROBE lists (a full search scans nprobe): on 256 lists of clustered vectors
    it finds true neighbours, fewer of them than the full search does."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(256, 16)).astype(np.float32)
    vectors = centres[rng.integers(0, 256, 20_000)] + 0.3 * rng.normal(size=(20_000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, _ = build_index(vectors, "IVF256,Flat")
    query = vectors[:1]
    exact = set(np.argsort(-(vectors @ query[0]))[:200].tolist())
    probe = set(probe_search(index, query, 200)[1][0].tolist())
    full = set(index.search(query, 200)[1][0].tolist())
    assert 0 < len(probe & exact) < len(full & exact)
