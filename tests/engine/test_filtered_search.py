"""Filters, pages, date order and near-duplicate collapse (#11), against a float64 brute force over the
records themselves (not the SQL the searcher runs), on a real index directory: FAISS on disk, SQLite."""

from __future__ import annotations

import datetime

import numpy as np
import pytest

from otclip.engine import metadata_store as store_module
from otclip.engine import search as search_module
from otclip.engine.filters import Filters, filters_from_strings
from otclip.engine.index_directory import IndexDirectory
from otclip.engine.metadata_store import ItemRecord
from otclip.engine.model_identity import ModelIdentity
from otclip.engine.search import IndexSearcher

N, DIM = 1200, 24
FOLDERS = ("beach", "city", "forest", "city-night")


def _day(i: int) -> float:
    return datetime.datetime(2020, 1, 1).timestamp() + 86400 * (i % 900)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """1200 images in 4 folders over 1000 contents (some content held by 2-3 paths), with labels, a
    manifest column `year`, sizes and dates (EXIF for two thirds, the file's mtime for the rest)."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(1000, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = []
    for i in range(N):
        content = i if i < 1000 else int(rng.integers(0, 1000))
        folder = FOLDERS[i % 4]
        records.append(ItemRecord(
            key=f"/photos/{folder}/{i:05d}.jpg", sha256=f"{content:064x}", row=content, label=f"label{i % 5}",
            extra={"year": str(2015 + i % 10), "camera": "X100" if i % 3 else "Z"}, size=1000 + i,
            mtime_ns=int(_day(i + 7) * 1e9), width=400 + (i % 7) * 100, height=300 + (i % 11) * 60,
            exif_time=_day(i) if i % 3 else None, shard="c0"))
    root = tmp_path_factory.mktemp("filtered") / "ix"
    directory = IndexDirectory(root)
    with directory.writing():
        directory.open_for_model("synthetic", ModelIdentity("synthetic", "0" * 64), DIM)
        directory.ingest_pending()  # (creates the new index's store, as every indexing run starts)
        directory.write_chunk("c0", "images", vectors, records)
        directory.ingest_pending()
        directory.publish("images", "Flat")
    return root, vectors, records


def brute_force(corpus, query, passes, k):
    """(path, score) of the best k contents among items that pass; a content shows its first passing path."""
    _, vectors, records = corpus
    best: dict[str, tuple[float, str]] = {}
    for r in records:
        if passes(r) and r.sha256 not in best:
            best[r.sha256] = (float(np.dot(vectors[r.row].astype(np.float64), query)), r.key)
    ranked = sorted(best.values(), key=lambda sk: -sk[0])[:k]
    return [(path, score) for score, path in ranked]


def found(page):
    return [(r.path, r.score) for r in page.results]


def same(got, expected) -> bool:
    """Same paths in the same order, scores equal up to float32 (the searcher's) against float64."""
    return [p for p, _ in got] == [p for p, _ in expected] and np.allclose(
        [s for _, s in got], [s for _, s in expected], atol=1e-5)


def taken(r: ItemRecord) -> float:
    return r.exif_time if r.exif_time is not None else r.mtime_ns / 1e9


CASES = {  # filters -> the same condition written independently, over one record
    "folder": (dict(under="/photos/city"), lambda r: r.key.startswith("/photos/city/")),
    "glob": (dict(glob="/photos/*/0*5.jpg"), lambda r: r.key.endswith("5.jpg") and "/0" in r.key),
    "label": (dict(label="label3"), lambda r: r.label == "label3"),
    "column equals": (dict(where=["camera=Z"]), lambda r: r.extra["camera"] == "Z"),
    "column range": (dict(where=["year=2017..2019"]), lambda r: 2017 <= int(r.extra["year"]) <= 2019),
    "open range": (dict(where=["width=..600"]), lambda r: r.width <= 600),
    "date": (dict(after="2021-03-01", before="2021-09-01"),
             lambda r: datetime.datetime(2021, 3, 1).timestamp() <= taken(r) < datetime.datetime(2021, 9, 1).timestamp()),
    "orientation": (dict(orientation="portrait"), lambda r: r.height > r.width),
    "sizes": (dict(min_width=800, min_height=600), lambda r: r.width >= 800 and r.height >= 600),
    "all at once": (dict(under="/photos/beach", where=["camera=X100", "year=2016..2022"], orientation="landscape"),
                    lambda r: r.key.startswith("/photos/beach/") and r.extra["camera"] == "X100"
                    and 2016 <= int(r.extra["year"]) <= 2022 and r.width > r.height),
    "rare": (dict(glob="/photos/forest/00042.jpg"), lambda r: r.key == "/photos/forest/00042.jpg"),
    "none pass": (dict(label="nobody"), lambda r: False),
}


@pytest.mark.parametrize("wide", [False, True], ids=["scored exactly", "FAISS then filtered"])
@pytest.mark.parametrize("case", CASES)
def test_filtered_search_returns_the_true_top_k_among_items_that_pass(case, wide, corpus, monkeypatch):
    if wide:  # every filter takes the other path: FAISS's best, filtered, fetching more until enough pass
        monkeypatch.setattr(search_module, "BRUTE_FORCE_MAX", 0)
        monkeypatch.setattr(store_module, "ID_BATCH", 7)  # the candidates' ids checked in many statements
    strings, passes = CASES[case]
    searcher = IndexSearcher(corpus[0])
    query = np.random.default_rng(sum(map(ord, case))).normal(size=DIM)
    query /= np.linalg.norm(query)
    page = searcher.search(query.astype(np.float32), k=15, filters=filters_from_strings(**strings))
    assert same(found(page), brute_force(corpus, query, passes, 15))


def test_pages_follow_each_other_and_end(corpus):
    searcher = IndexSearcher(corpus[0])
    query = corpus[1][3]
    filters = filters_from_strings(under="/photos/beach")
    whole = searcher.search(query, k=40, filters=filters)
    pages = [searcher.search(query, k=10, offset=o, filters=filters) for o in range(0, 40, 10)]
    assert [r for p in pages for r in found(p)] == found(whole)
    assert [r.rank for r in pages[1].results] == list(range(11, 21)) and all(p.more for p in pages)
    passing = sum(1 for r in corpus[2] if r.key.startswith("/photos/beach/"))  # (distinct contents: fewer)
    last = searcher.search(query, k=10, offset=passing - 5, filters=filters)
    assert not last.more and len(last.results) <= 5


def test_date_order_sorts_the_results_above_the_cutoff_newest_first(corpus):
    searcher = IndexSearcher(corpus[0])
    query = corpus[1][10]
    page = searcher.search(query, k=50, min_score=0.2, order="date")
    above = brute_force(corpus, query.astype(np.float64), lambda r: True, N)
    above = {path for path, score in above if score >= 0.2}
    assert {r.path for r in page.results} <= above and len(page.results) == min(50, len(above))
    dates = [r.taken for r in page.results]
    assert dates == sorted(dates, reverse=True)
    assert dates[0] == max(taken(r) for r in corpus[2] if r.key in above)


def test_near_duplicates_collapse_into_the_best_one(tmp_path):
    """Three tight clusters of 4 near-identical vectors (cosine > 0.99 inside, < 0.5 across)."""
    rng = np.random.default_rng(1)
    centres = np.eye(3, 8, dtype=np.float32)
    vectors = np.repeat(centres, 4, axis=0) + 0.01 * rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    directory = IndexDirectory(tmp_path / "ix")
    with directory.writing():
        directory.open_for_model("synthetic", ModelIdentity("synthetic", "0" * 64), 8)
        directory.ingest_pending()
        directory.write_chunk("c0", "images", vectors, [
            ItemRecord(key=f"/p/{i}.jpg", sha256=f"{i:064x}", row=i) for i in range(12)])
        directory.ingest_pending()
        directory.publish("images", "Flat")
    searcher = IndexSearcher(tmp_path / "ix")
    query = np.array([1, 0.6, 0.3, 0, 0, 0, 0, 0], np.float32)
    query /= np.linalg.norm(query)
    plain = searcher.search(query, k=6)
    assert {int(r.path[3:-4]) // 4 for r in plain.results} <= {0, 1}  # the top 6 are 2 clusters
    collapsed = searcher.search(query, k=3, collapse=0.95)
    assert [int(r.path[3:-4]) // 4 for r in collapsed.results] == [0, 1, 2]
    assert collapsed.results[0].path == plain.results[0].path


def test_bad_filters_are_one_line():
    for kwargs, message in ((dict(where=["year"]), "COLUMN=VALUE"), (dict(where=["width>=500"]), r"\(width=500\.\.\)"),
                            (dict(where=["year <= 2019"]), r"\(year=\.\.2019\)"), (dict(where=["a!=1"]), "COLUMN=LO"),
                            (dict(after="June"), "--after 'June'"),
                            (dict(orientation="diagonal"), "orientation")):
        with pytest.raises(ValueError, match=message):
            filters_from_strings(**kwargs)
    assert Filters().is_empty() and not filters_from_strings(label="x").is_empty()


def test_the_earliest_and_latest_dates_are_dates():
    """`--after 0001-01-01` (everything) was 'expected a date': its local time would fall in year 0."""
    import datetime

    first = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    assert filters_from_strings(after="0001-01-01").taken_after == pytest.approx(first)
    assert filters_from_strings(before="9999-12-31").taken_before == datetime.datetime(9999, 12, 31).timestamp()
    assert filters_from_strings(after="2024-06-30").taken_after == datetime.datetime(2024, 6, 30).timestamp()  # local


@pytest.mark.parametrize("vectors_file", [True, False], ids=["vectors file", "older index without it"])
@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16", "IVF8,PQ4"])
def test_exact_scores_whatever_the_index_keeps(factory, vectors_file, corpus, tmp_path):
    """A filtered set scored exactly: from the side's position-ordered vectors file; for an index published
    without it, from the index's own copies (HNSW-Flat) or from the embedding chunks (IVF lists, PQ codes)."""
    _, vectors, records = corpus
    directory = IndexDirectory(tmp_path / "ix")
    with directory.writing():
        directory.open_for_model("synthetic", ModelIdentity("synthetic", "0" * 64), DIM)
        directory.ingest_pending()
        directory.write_chunk("c0", "images", vectors, records)
        directory.ingest_pending()
        directory.publish("images", factory)
    if not vectors_file:
        directory.side_file("images", ".vectors.npy").unlink()
    searcher = IndexSearcher(tmp_path / "ix")
    assert (searcher._side("images").vectors is not None) == vectors_file
    query = vectors[5] + 0.5 * vectors[6]
    query /= np.linalg.norm(query)
    for strings, passes in (CASES["all at once"], CASES["rare"]):  # too few pass among FAISS's best 48
        page = searcher.search(query, k=12, filters=filters_from_strings(**strings))
        assert same(found(page), brute_force(corpus, query.astype(np.float64), passes, 12))
