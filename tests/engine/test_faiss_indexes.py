import ctypes
import shutil

import faiss
import numpy as np
import pytest
from faiss.contrib.inspect_tools import get_invlist

from otclip.engine import faiss_indexes
from otclip.engine.faiss_indexes import (
    add_rows,
    auto_factory,
    best_k,
    build_index,
    configure_search,
    default_nprobe,
    estimated_bytes,
    load_index,
    merge_shard_files,
    mergeable,
    new_index,
    on_disk_lists,
    probe_search,
    rerank_factor,
    save_index,
    train_index,
)
from otclip.engine.index_directory import LoadedSide
from otclip.engine.search import nearest


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
    SQ8 1M x (384 + 8) B = 398 MB; SQ6 1M x (288 + 8) B = 302 MB; SQ4 1M x (192 + 8) B = 206 MB;
    OPQ96/PQ96 1M x (96 + 8) B + centroids + codebooks 256 x 384 x 4 B + rotation 384^2 x 4 B = 111.3 MB;
    PQ64 79.3 MB; PQ8 23.3 MB."""
    n, d = 1_000_000, 384
    assert auto_factory(n, d, 2 * 10**9) == "IVF4096,Flat"
    assert auto_factory(n, d, 10**9) == "IVF4096,SQ8"
    assert auto_factory(n, d, 303 * 10**6) == "IVF4096,SQ6"
    assert auto_factory(n, d, 301 * 10**6) == "IVF4096,SQ4"
    assert auto_factory(n, d, 207 * 10**6) == "IVF4096,SQ4"
    assert auto_factory(n, d, 120 * 10**6) == "OPQ96,IVF4096,PQ96"
    assert auto_factory(n, d, 100 * 10**6) == "OPQ64,IVF4096,PQ64"
    assert auto_factory(n, d, 24 * 10**6) == "OPQ8,IVF4096,PQ8"
    with pytest.raises(ValueError, match="no index of 1000000 vectors of 384 dimensions fits; the smallest, "
                                         "OPQ8,IVF4096,PQ8, takes 23.3 MB"):
        auto_factory(n, d, 20 * 10**6)
    assert auto_factory(1000, 384, 10**9) == "Flat"


def test_ten_million_vectors_find_their_lists_through_an_hnsw_graph():
    """Hand-computed at 10M x 512-d: 4 sqrt(10M) = 12649 -> 2^14 = 16384 lists (LARGE_NLIST), found through
    HNSW32. SQ8: 10M x 520 B = 5.2 GB, over a 4 GB budget; SQ6: 10M x 392 B = 3.92 GB + centroids 16384 x
    2048 B = 33.55 MB + HNSW links 16384 x (64 x 4 + 16) B = 4.46 MB = 3.958 GB; SQ4 2.64 GB + 38 MB;
    OPQ64/PQ64: 10M x 72 B = 720 MB + 38 MB + codebooks 0.52 MB + rotation 1.05 MB.
    At 8M (4 sqrt(8M) = 11314 -> 2^13) the lists stay few enough to compare with all."""
    assert auto_factory(10_000_000, 512) == "IVF16384_HNSW32,SQ8"
    assert auto_factory(10_000_000, 512, 4 * 10**9) == "IVF16384_HNSW32,SQ6"
    assert estimated_bytes("IVF16384_HNSW32,SQ6", 10_000_000, 512) == pytest.approx(3_958_010_880, rel=1e-3)
    assert auto_factory(10_000_000, 512, 3 * 10**9) == "IVF16384_HNSW32,SQ4"
    assert auto_factory(10_000_000, 512, 10**9) == "OPQ64,IVF16384_HNSW32,PQ64"
    assert auto_factory(8_000_000, 512) == "IVF8192,SQ8"
    expected = 720_000_000 + 33_554_432 + 16384 * 272 + 524_288 + 1_048_576
    assert estimated_bytes("OPQ64,IVF16384_HNSW32,PQ64", 10_000_000, 512) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("factory, n", [("IVF256_HNSW32,Flat", 20_000), ("OPQ8,IVF256_HNSW32,PQ8", 4000)])
def test_many_lists_train_in_two_levels_and_find_the_true_neighbours(monkeypatch, factory, n):
    """Past LARGE_NLIST lists (lowered here to 256) the centroids come from FAISS's two-level clustering
    (16 groups, then 256 lists), unit-norm, in the OPQ rotation's output space when there is one; search through
    the HNSW quantizer keeps recall@10 >= 0.9 against a float64 brute force (PQ codes re-ranked exactly, as the
    searcher does)."""
    import faiss.contrib.clustering as clustering

    calls, real = [], clustering.two_level_clustering
    monkeypatch.setattr(clustering, "two_level_clustering", lambda x, *a, **kw: calls.append(a) or real(x, *a, **kw))
    monkeypatch.setattr(faiss_indexes, "LARGE_NLIST", 256)
    x, q = clustered(n), clustered(100, seed=4)
    index, _ = build_index(x, factory)
    assert calls == [(16, 256)] and index.is_trained and index.ntotal == n
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-4)
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch >= 2 * ivf.nprobe
    exact = np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1)[:, :10]
    found = nearest(LoadedSide(index, np.arange(n), x, rerank_factor(index)), q, 10)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]) >= 0.9


def test_vectors_added_through_an_hnsw_quantizer_land_in_their_nearest_list():
    """Each vector belongs in the list of its nearest centroid (a brute force over the centroids). A sparse graph
    (HNSW4, 1024 centroids of 256-d clustered data) searched with FAISS's default 16 candidates put 3.8% of
    them elsewhere, where a search probing the right lists misses them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 256))[rng.integers(0, 100, 40_000)] + 0.6 * rng.normal(size=(40_000, 256))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    index = add_rows(train_index(x, "IVF1024_HNSW4,Flat")[0], x)
    ivf = faiss.extract_index_ivf(index)
    centroids = faiss.downcast_index(ivf.quantizer).storage.reconstruct_n(0, ivf.nlist)
    nearest_list = np.argmax(x @ centroids.T, axis=1)
    held = np.full(len(x), -1)
    for list_no in range(ivf.nlist):
        held[get_invlist(ivf.invlists, list_no)[0]] = list_no
    assert np.mean(held == nearest_list) >= 0.99


@pytest.mark.parametrize("factory, rerank", [("Flat", 1), ("IVF64,Flat", 1), ("IVF64_HNSW32,Flat", 1), ("IVF64,SQ8", 4),
                                             ("IVF64,SQ6", 4), ("IVF64,SQ4", 10), ("OPQ4,IVF64,PQ4", 40)])
def test_estimated_bytes_are_the_built_index_size(factory, rerank):
    """The estimate against FAISS's own serialisation of the built index (within 2%: list headers aside); and
    how many candidates a search re-ranks: none for full vectors, 4x for 6-8 bits a dimension, 10x for 4, 40x
    for PQ."""
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


def c_stdout(capfd) -> str:
    """What reached standard output, C's buffered printf included (flushed first: a pipe's buffer is not)."""
    ctypes.CDLL(None).fflush(None)
    return capfd.readouterr().out


def contents(index):
    """What an index holds, list by list (ids and codes) for an IVF index, else its serialised bytes."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return bytes(faiss.serialize_index(index))
    return [tuple(part.tobytes() for part in get_invlist(ivf.invlists, i)) for i in range(ivf.nlist)]


@pytest.mark.parametrize("factory", ["Flat", "SQ8", "IVF32,Flat", "OPQ8,IVF32,PQ8", "IVF32_HNSW8,SQ8"])
def test_shard_files_merged_are_the_index_built_at_once(factory, tmp_path, capfd):
    """What torchrun ranks write (`publish`): each adds its consecutive rows to a copy of the trained index and
    saves it; merged in order (IVF lists on disk) they hold what FAISS's own `add` of every row puts in one index,
    list by list, so every search answers alike."""
    x = clustered(3000)
    trained, _ = train_index(x, factory)
    reference = configure_search(faiss.clone_index(trained))  # the search parameters `add_rows` sets
    reference.add(x)  # FAISS numbers rows 0, 1, ... itself
    assert bytes(faiss.serialize_index(add_rows(faiss.clone_index(trained), x))) == bytes(
        faiss.serialize_index(reference))
    cuts = [0, 1000, 1001, 3000]  # uneven shares, one of a single row
    paths = [save_index(add_rows(faiss.clone_index(trained), x, a, b), tmp_path / f"shard-{i}.faiss")
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    assert mergeable(trained)
    merged = merge_shard_files(trained, paths, tmp_path / "m.ivfdata")
    assert merged.ntotal == 3000
    on_disk = "IVF" in factory
    assert (on_disk_lists(merged) is not None) == on_disk == (tmp_path / "m.ivfdata").exists()
    loaded = load_index(save_index(merged, tmp_path / "m.faiss"), use_gpu=False)
    assert contents(loaded) == contents(reference)
    for index in (loaded, reference):
        if on_disk:
            faiss.extract_index_ivf(index).nprobe = 32  # every list
    np.testing.assert_array_equal(loaded.search(x[:200], 10)[1], reference.search(x[:200], 10)[1])
    assert c_stdout(capfd) == ""  # FAISS's "resizing FILE to N bytes" is not the user's output


def test_merged_lists_are_read_beside_their_index_and_checked(tmp_path, capfd):
    """A folder moved or copied still reads its own lists file (not the path written at build time, even while
    that one exists); a lists file cut short is refused (reading it would crash the process with SIGBUS)."""
    x = clustered(2000)
    trained, _ = train_index(x, "IVF16,Flat")
    built = tmp_path / "built"
    built.mkdir()
    paths = [save_index(add_rows(faiss.clone_index(trained), x, a, b), built / f"s{a}.faiss")
             for a, b in ((0, 700), (700, 2000))]
    save_index(merge_shard_files(trained, paths, built / "i.ivfdata"), built / "i.faiss")
    expected = load_index(built / "i.faiss", use_gpu=False).search(x[:50], 5)
    assert on_disk_lists(load_index(built / "i.faiss", use_gpu=False)).filename == str(built / "i.ivfdata")
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    loaded = load_index(copy / "i.faiss", use_gpu=False, mmap=True)
    assert on_disk_lists(loaded).filename == str(copy / "i.ivfdata")
    shutil.rmtree(built)
    for found, wanted in zip(loaded.search(x[:50], 5), expected):
        np.testing.assert_array_equal(found, wanted)
    assert c_stdout(capfd) == ""  # nor is FAISS's "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename"
    del loaded  # a file cut short under a live mapping would crash this process (as it would a server)
    size = (copy / "i.ivfdata").stat().st_size
    with open(copy / "i.ivfdata", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="i.ivfdata: cut short"):
        load_index(copy / "i.faiss", use_gpu=False)
    (copy / "i.ivfdata").unlink()
    with pytest.raises((ValueError, RuntimeError), match="i.ivfdata"):
        load_index(copy / "i.faiss", use_gpu=False)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF16,Flat,RFlat", "IVF16,PQ8x4fs"])
def test_indexes_that_keep_data_outside_plain_lists_do_not_merge(factory):
    """An HNSW graph, a refine wrapper's own vectors, fast-scan's packed blocks: filled by one process instead."""
    assert not mergeable(train_index(clustered(1000), factory)[0])
    assert mergeable(train_index(clustered(300), "SQ8")[0])


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


def test_a_search_scans_a_sixteenth_of_the_lists_up_to_256():
    """At 10M vectors (16384 lists) a sixteenth was 1024 lists, 47 ms a query where 256 kept recall@10 0.991."""
    assert [default_nprobe(new_index(f"IVF{nlist},Flat", 8)) for nlist in (64, 1024, 4096, 8192, 16384)] == \
        [8, 64, 256, 256, 256]
    assert default_nprobe(new_index("Flat", 8)) is None


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


def test_one_process_adds_a_large_ivf_index_in_parts_merged_on_disk(tmp_path, monkeypatch):
    """Past PART_BYTES of lists, `publish` in one process adds the rows a part at a time (each part a shard file)
    and merges the parts on disk: the .ivfdata lists hold, list by list, what one `add` of every row gives, the
    index is served from them memory-mapped, and no part or trained file is left."""
    from synthetic_index import DIM, make_index
    from synthetic_index import clustered as unit_vectors

    from otclip.engine import index_directory

    x = unit_vectors(3000, seed=4)
    whole = make_index(tmp_path / "whole", x, "IVF16,Flat")
    added = []
    monkeypatch.setattr(index_directory, "add_rows", lambda index, v, start=0, stop=None, progress=False:
                        added.append((start, stop)) or add_rows(index, v, start, stop, progress))
    monkeypatch.setattr(index_directory, "PART_BYTES", 1100 * (DIM * 4 + 8))  # three parts of 1,000 rows
    parts = make_index(tmp_path / "parts", x, "IVF16,Flat")
    assert added == [(0, 1000), (1000, 2000), (2000, 3000)]
    assert parts.manifest()["sides"]["images"]["lists_on_disk"] and parts.side_file("images", ".ivfdata").exists()
    assert not whole.manifest()["sides"]["images"]["lists_on_disk"]
    assert not list((tmp_path / "parts").glob("*.shard-*")) and not list((tmp_path / "parts").glob("*.trained.*"))
    a, b = (d.load_side("images", use_gpu=False).index for d in (whole, parts))
    assert on_disk_lists(b) is not None and contents(a) == contents(b)
    for index in (a, b):
        faiss.extract_index_ivf(index).nprobe = 16
    np.testing.assert_array_equal(a.search(x[:100], 10)[1], b.search(x[:100], 10)[1])


def test_a_build_killed_before_its_commit_leaves_nothing_once_the_next_writer_holds_the_lock(tmp_path):
    """A `publish` killed (SIGKILL) after it wrote a new generation's vectors, index and on-disk lists but before
    the manifest named them: the next writer removes those files and only those; the published generation still
    serves, and the next build takes the number again. Where the manifest names no generation of the side (a
    rebuilt manifest), nothing is removed: a server may hold those files."""
    import json
    import subprocess
    import sys

    from synthetic_index import DIM, make_index
    from synthetic_index import clustered as unit_vectors

    from otclip.engine.index_directory import IndexDirectory

    x = unit_vectors(3000, seed=5)
    root = tmp_path / "ix"
    directory = make_index(root, x, "IVF16,Flat")
    published = directory.manifest()["sides"]["images"]["generation"]
    before = sorted(p.name for p in root.glob("images-*"))
    served = directory.load_side("images", use_gpu=False).index.search(x[:50], 10)[1]
    kill = ("import os, signal\nfrom otclip.engine import index_directory\n"
            f"index_directory.PART_BYTES = {1100 * (DIM * 4 + 8)}\n"  # added in parts: lists merged into .ivfdata
            "index_directory.write_npy_atomically = lambda path, array: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"directory = index_directory.IndexDirectory({str(root)!r})\n"
            "with directory.writing():\n    directory.publish('images', 'IVF16,Flat')\n")
    assert subprocess.run([sys.executable, "-c", kill]).returncode == -9
    unpublished = {p.name for p in root.glob("images-*")} - set(before)
    assert unpublished == {f"images-{published + 1}{suffix}" for suffix in (".faiss", ".ivfdata", ".vectors.npy")}

    manifest = json.loads((root / "manifest.json").read_text())
    for damaged in ("{", json.dumps(dict(manifest, sides={})), json.dumps(dict(manifest, sides={"images": "x"}))):
        (root / "manifest.json").write_text(damaged)  # unreadable; rebuilt (no side named); a side entry damaged
        with IndexDirectory(root).writing():  # the lock `repair` takes still holds
            pass
        assert unpublished <= {p.name for p in root.glob("images-*")}
    (root / "manifest.json").write_text(json.dumps(manifest))

    with IndexDirectory(root).writing():
        pass
    assert sorted(p.name for p in root.glob("images-*")) == before
    index = IndexDirectory(root).load_side("images", use_gpu=False).index
    assert index.ntotal == 3000 and np.array_equal(index.search(x[:50], 10)[1], served)
    with directory.writing():
        assert directory.publish("images", "IVF16,Flat")["generation"] == published + 1
    assert sorted(p.name for p in root.glob("images-*")) == [f"images-{published + 1}{suffix}" for suffix in
                                                              (".faiss", ".ids.npy", ".vectors.npy")]
