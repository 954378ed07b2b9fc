"""Compressed indexes (#12): candidates of lossy codes re-ranked exactly from the side's vectors file, and the
measured recall `otclip info --recall` reports, both against a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_index import clustered, make_index

from otclip.engine.search import IndexSearcher, measured_recall

N = 1500


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory):
    vectors = clustered(N, 0)
    return make_index(tmp_path_factory.mktemp("pq") / "ix", vectors, "IVF32,PQ4"), vectors


def recall(found: list[list[int]], queries: np.ndarray, vectors: np.ndarray, k: int) -> float:
    exact = np.argsort(-(queries.astype(np.float64) @ vectors.astype(np.float64).T), axis=1)[:, :k]
    return float(np.mean([len(set(f) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def test_lossy_codes_are_re_ranked_exactly(pq_index):
    """PQ4 on 16-d vectors is coarse: alone it finds a fraction of the true top 10; re-ranking 40x as many
    candidates with the stored vectors finds more, and every score shown is the exact cosine."""
    directory, vectors = pq_index
    queries = clustered(50, 1)
    searcher = IndexSearcher(directory.root)
    loaded = searcher._side("images")
    assert not loaded.exact and loaded.vectors is not None
    plain = [[int(loaded.ids[p]) - 1 for p in row if p >= 0] for row in loaded.index.search(queries, 10)[1]]
    pages = [searcher.search(q, k=10) for q in queries]
    reranked = [[int(r.path[3:-4]) for r in page.results] for page in pages]
    assert recall(reranked, queries, vectors, 10) > recall(plain, queries, vectors, 10) + 0.1
    for q, page in zip(queries, pages):
        exact = [float(vectors[int(r.path[3:-4])].astype(np.float64) @ q.astype(np.float64)) for r in page.results]
        assert np.allclose([r.score for r in page.results], exact, atol=1e-5)
        assert [r.score for r in page.results] == sorted((r.score for r in page.results), reverse=True)


def test_an_index_without_its_vectors_file_answers_from_its_codes(pq_index, tmp_path):
    directory, vectors = pq_index
    copy = make_index(tmp_path / "ix", vectors, "IVF32,PQ4")
    copy.side_file("images", ".vectors.npy").unlink()
    loaded = IndexSearcher(copy.root)._side("images")
    assert loaded.vectors is None
    query = clustered(1, 1)
    assert (IndexSearcher(copy.root).search(query[0], k=10).results[0].score
            == pytest.approx(float(loaded.index.search(query, 1)[0][0, 0])))


def test_measured_recall_is_a_brute_force_with_each_query_held_out(pq_index):
    """Every stored vector as a query (sample = n): the searcher's 11 best minus the query itself against a
    float64 brute force's 10 best other vectors (the measurement's brute force is float32: near-ties at the
    10th neighbour may swap, a few in 15 000)."""
    directory, vectors = pq_index
    searcher = IndexSearcher(directory.root)
    loaded = searcher._side("images")
    got = measured_recall(loaded, sample=N, k=10)
    exact = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    np.fill_diagonal(exact, -np.inf)
    truth = np.argsort(-exact, axis=1)[:, :10]
    hits = []
    for q in range(N):
        page = searcher.search(vectors[q], k=11)
        others = [int(r.path[3:-4]) for r in page.results if int(r.path[3:-4]) != q][:10]
        hits.append(len(set(others) & set(truth[q].tolist())))
    assert got == pytest.approx(np.mean(hits) / 10, abs=0.005)
    plain = [[p for p in row.tolist() if p != q][:10] for q, row in enumerate(loaded.index.search(vectors, 11)[1])]
    assert np.mean([len(set(p) & set(t.tolist())) for p, t in zip(plain, truth)]) / 10 < got - 0.1  # codes alone


def test_publishing_reads_the_vectors_a_block_at_a_time(tmp_path, monkeypatch):
    """The vectors file is copied from the chunks and the index built from it memory-mapped, 7 rows at a
    time here: the file holds every vector in id order, and the index answers as one built in one piece."""
    from otclip.engine import faiss_indexes, index_directory
    from otclip.engine.faiss_indexes import build_index

    vectors = clustered(500, 3)
    whole, _ = build_index(vectors, "IVF16,Flat")
    monkeypatch.setattr(faiss_indexes, "ADD_BLOCK", 7)
    monkeypatch.setattr(index_directory, "ADD_BLOCK", 7)
    directory = make_index(tmp_path / "ix", vectors, "IVF16,Flat")
    stored = np.load(directory.side_file("images", ".vectors.npy"))
    np.testing.assert_array_equal(stored, vectors)
    loaded = directory.load_side("images", use_gpu=False)
    queries = clustered(20, 4)
    np.testing.assert_array_equal(loaded.index.search(queries, 10)[1], whole.search(queries, 10)[1])
    assert not list(tmp_path.glob("ix/.*tmp*"))


def test_a_failed_build_leaves_no_vectors_file(tmp_path):
    directory = make_index(tmp_path / "ix", clustered(100, 5), "Flat")
    with pytest.raises(ValueError, match="needs at least 256 vectors"):
        with directory.writing():
            directory.publish("images", "IVF256,Flat")
    assert sorted(p.name for p in directory.root.glob("images-*")) == [
        "images-1.faiss", "images-1.ids.npy", "images-1.vectors.npy"]
