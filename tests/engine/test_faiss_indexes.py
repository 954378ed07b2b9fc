import faiss
import numpy as np
import pytest

from otclip.engine.faiss_indexes import auto_factory, build_index, load_index, save_index


def clustered(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, d))[rng.integers(0, 50, n)] + 0.5 * rng.normal(size=(n, d))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    return x


def test_auto_factory_grows_with_the_collection():
    assert auto_factory(1000, 384) == "Flat"
    assert auto_factory(100_000, 384).startswith("IVF") and auto_factory(100_000, 384).endswith(",Flat")
    assert "PQ" in auto_factory(5_000_000, 384)


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
