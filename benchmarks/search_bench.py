"""Search benchmark on clustered synthetic unit vectors: build time, single-query p50/p99 latency,
batch QPS, recall@10 against exact search, index size, for `auto` and a few factory strings; and
our search call (IndexSearcher.search: FAISS + id mapping + SQLite metadata), unfiltered and filtered
(0.1% to 50% of the items pass), against the raw `index.search` in the same run.
Writes benchmarks/results/search_bench-N-Dd.json.

  python benchmarks/search_bench.py [--n 1000000] [--dim 512] [--factories auto "IVF1024,Flat" "HNSW32"]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from otclip.engine.faiss_indexes import auto_factory, build_index, gpu_count, rerank_factor
from otclip.engine.index_directory import LoadedSide
from otclip.engine.search import nearest


def clustered_blocks(n: int, dim: int, clusters: int = 1000, seed: int = 0, block: int = 100_000):
    """n unit vectors around `clusters` Gaussian centres (noise 0.6 a dimension), `block` rows at a time: the
    same rows whatever reads them, so a 10M set never has to be in RAM at once."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        out = centers[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
        faiss.normalize_L2(out)
        yield out


def clustered_unit_vectors(n: int, dim: int, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    return np.concatenate(list(clustered_blocks(n, dim, clusters, seed)))


def latencies(fn, queries) -> np.ndarray:
    """ms per call of fn on each of `queries` (query vectors as (1, d) rows, or any items)."""
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None] if isinstance(q, np.ndarray) else q)
        times.append(time.perf_counter() - t)
    return np.array(times) * 1000


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


FILTERS = {  # name -> the filter fields of query j: each query a different value, so no filter is seen twice
    # (the fraction passing is measured: the names say it for n = 1M)
    "folder 1%": lambda j: dict(under=f"/photos/f{j % 100:02d}"),
    "label 1%": lambda j: dict(label=f"l{j % 100}"),
    "date (a week) 1%": lambda j: dict(after=f"{_day(7 * (j % 90) + 1)}", before=f"{_day(7 * (j % 90) + 8)}"),
    "manifest column 1%": lambda j: dict(where=[f"group={j % 100}"]),
    "path glob 0.2%": lambda j: dict(glob=f"/photos/f{j % 100:02d}/*[05]{j % 100:02d}.jpg"),
    "folders 10%": lambda j: dict(glob=f"/photos/f{j % 10}?/*"),
    "orientation 50%": lambda j: dict(orientation=("landscape", "portrait")[j % 2]),
}


def _day(d: int) -> str:
    import datetime

    return (datetime.date(2020, 1, 1) + datetime.timedelta(days=d)).isoformat()


def filtered_search(vectors: np.ndarray, queries: np.ndarray, k: int, index_dir: Path | None = None) -> dict:
    """Our search (IndexSearcher.search: FAISS + ids + SQLite metadata) on a real index directory holding these
    vectors (`auto` factory), unfiltered and with filters passing 0.1% to 50% of the items, against the raw
    `index.search` of the same FAISS index. Items: 100 folders, 100 labels, a manifest column, one date per
    minute from 2020-01-01 (a week is 1% at 1M), landscape or portrait alternately."""
    from otclip.engine.filters import filters_from_strings
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.search import IndexSearcher

    root = index_dir or Path(tempfile.mkdtemp(prefix="otclip-bench-")) / "ix"
    directory = IndexDirectory(root)
    t = time.perf_counter()
    if directory.manifest_path.exists() and directory.manifest()["sides"]["images"]["vectors"] == len(vectors):
        side, build_s = directory.manifest()["sides"]["images"], None  # --index-dir: an earlier run's, same --n
    else:
        side = _filtered_index(directory, vectors)
        build_s = time.perf_counter() - t
    opened = {}
    for name, flag in (("read", 0), ("mmap", faiss.IO_FLAG_MMAP_IFC)):  # the file is in the page cache either way
        t = time.perf_counter()
        faiss.read_index(str(directory.side_file("images", ".faiss")), flag)
        opened[name] = time.perf_counter() - t
    t = time.perf_counter()
    searcher = IndexSearcher(root)  # searching by vector needs no model; it maps the index (and the vectors)
    opened["IndexSearcher"] = time.perf_counter() - t
    index = directory.load_side("images", use_gpu=False).index  # read into RAM: the raw reference
    # a fresh mapping pays a page fault for each page a query touches first (the file is in the page cache):
    # measured once, then the rows below run on the warm mapping, as in a server that has answered a while
    warm_up = [filters_from_strings(**FILTERS["label 1%"](j + 50)) for j in range(len(queries))]
    rows = {"ours, first queries after opening": latencies(lambda q: searcher.search(q[0], k=k), queries),
            "ours, first filtered (label 1%)": latencies(
                lambda j: searcher.search(queries[j], k=k, filters=warm_up[j]), range(len(queries))),
            "raw index.search": latencies(lambda q: index.search(q, k), queries),
            "ours, unfiltered": latencies(lambda q: searcher.search(q[0], k=k), queries)}
    passing = {"ours, first filtered (label 1%)": 0.01}
    for name, fields in FILTERS.items():
        filters = [filters_from_strings(**fields(j)) for j in range(len(queries))]
        passing[name] = float(np.mean([searcher.count(f) for f in filters[:10]])) / len(vectors)
        rows[name] = latencies(lambda j, filters=filters: searcher.search(queries[j], k=k, filters=filters[j]),
                               range(len(queries)))
    base = float(np.median(rows["ours, unfiltered"]))
    return {"factory": side["factory"], "build_s": build_s, "open_s": opened,
            "rows": {name: {"p50_ms": float(np.median(v)), "p99_ms": float(np.percentile(v, 99)),
                            "over_unfiltered_p50": float(np.median(v)) / base, "passing": passing.get(name, 1.0)}
                     for name, v in rows.items()}}


def _filtered_index(directory, vectors: np.ndarray) -> dict:
    """Fill an index directory with these vectors and the items' metadata FILTERS selects on."""
    import datetime

    from otclip.engine.metadata_store import ItemRecord
    from otclip.engine.model_identity import ModelIdentity

    start_time = datetime.datetime(2020, 1, 1).timestamp()
    with directory.writing():
        directory.open_for_model("bench", ModelIdentity("bench", "0" * 64), vectors.shape[1])
        directory.ingest_pending()
        step = 100_000
        for c, start in enumerate(range(0, len(vectors), step)):
            part = vectors[start : start + step]
            records = [ItemRecord(key=f"/photos/f{(start + i) % 100:02d}/{start + i}.jpg", sha256=f"{start + i:064x}",
                                  row=i, label=f"l{(start + i) % 100}", extra={"group": str((start + i) % 100)},
                                  width=640 if i % 2 else 480, height=480 if i % 2 else 640,
                                  exif_time=start_time + 60.0 * (start + i * 7 % step)) for i in range(len(part))]
            directory.write_chunk(f"bench-{c:04d}", "images", part, records)
            directory.ingest_chunk(f"bench-{c:04d}")
        directory.ingest_pending()
        directory.store.index_columns(["group"])  # as `otclip index` does for a manifest's columns
        return directory.publish("images", factory="auto")


def end_to_end(n_images: int) -> dict:
    """Indexing throughput on a folder of real JPEGs (variants of the sample photos) against encoding
    the same files alone, and text-query latency (encode + search + metadata) against its parts."""

    from otclip.engine import Encoder, load_model
    from otclip.engine.sample_photos import SAMPLE_PHOTOS, sample_photo
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    folder = Path(tempfile.mkdtemp(prefix="otclip-jpegs-"))
    photos = [sample_photo(p.name) for p in SAMPLE_PHOTOS]
    for i in range(n_images):
        img = photos[i % len(photos)].rotate(7 * (i // len(photos)), expand=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    loaded = load_model("effnet-minilm")
    paths = sorted(folder.iterdir())
    t = time.perf_counter()
    Encoder(loaded).encode_images(paths, progress=False)
    encode_s = time.perf_counter() - t
    out = Path(tempfile.mkdtemp(prefix="otclip-e2e-")) / "ix"
    t = time.perf_counter()
    index_images(folder, out, loaded, progress=False)
    index_s = time.perf_counter() - t
    searcher = IndexSearcher(out, model=loaded)
    queries = [p.caption for p in SAMPLE_PHOTOS] * 3
    enc = Encoder(loaded)

    def text_latencies(fn) -> np.ndarray:
        times = []
        for q in queries:
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
        return np.array(times) * 1000

    full = text_latencies(lambda q: searcher.search_text(q, k=10))
    encode_only = text_latencies(enc.encode_text)
    return {"images": n_images, "index_images_per_s": n_images / index_s, "encode_only_images_per_s": n_images / encode_s,
            "index_over_encode": encode_s / index_s, "text_query_p50_ms": float(np.median(full)),
            "text_query_p99_ms": float(np.percentile(full, 99)), "text_encode_p50_ms": float(np.median(encode_only))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index-dir", type=Path, help="keep the filtered-search index directory here and reuse it "
                    "on the next run with the same --n and --dim (its build takes minutes at 1M)")
    ap.add_argument("--factories", nargs="*", default=["auto", "IVF1024,Flat", "IVF1024,PQ64", "HNSW32"])
    ap.add_argument("--e2e-images", type=int, default=200, help="real JPEGs for the end-to-end section (0: skip)")
    args = ap.parse_args()

    everything = clustered_unit_vectors(args.n + args.queries, args.dim)  # queries from the same clusters
    vectors, queries = everything[: args.n], np.ascontiguousarray(everything[args.n :])
    del everything
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    _, truth = exact.search(queries, args.k)
    rows = []
    for factory in args.factories:
        t = time.perf_counter()
        index, used = build_index(vectors, factory)
        build_s = time.perf_counter() - t
        _, found = index.search(queries, args.k)
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
        lat = latencies(lambda q, index=index: index.search(q, args.k), queries[:100])
        t = time.perf_counter()
        index.search(queries, args.k)
        qps = len(queries) / (time.perf_counter() - t)
        row = {"factory": factory, "resolved": used, "build_s": build_s, "p50_ms": float(np.median(lat)),
               "p99_ms": float(np.percentile(lat, 99)), "batch_qps": qps, "recall@10": recall,
               "index_mb": index_bytes(index) / 1e6}
        if rerank_factor(index) > 1:  # lossy codes: as the searcher answers, candidates re-scored exactly
            side = LoadedSide(index, np.arange(len(vectors)), vectors, rerank_factor(index))
            _, found = nearest(side, queries, args.k)
            row["recall@10 reranked"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
            row["p50_ms reranked"] = float(np.median(latencies(lambda q, side=side: nearest(side, q, args.k), queries[:100])))
        rows.append(row)
    filtered = filtered_search(vectors, queries[:100], args.k, args.index_dir)
    print(f"n={args.n} dim={args.dim} (auto -> {auto_factory(args.n, args.dim)}), GPUs seen by FAISS: {gpu_count()}")
    print(f"{'factory':<22}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'QPS':>9}{'R@10':>7}{'MB':>9}"
          f"{'R@10 reranked':>15}{'p50 ms':>9}")
    for r in rows:
        reranked = (f"{r['recall@10 reranked']:>15.3f}{r['p50_ms reranked']:>9.2f}" if "recall@10 reranked" in r else "")
        print(f"{r['factory']:<22}{r['build_s']:>9.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['batch_qps']:>9.0f}"
              f"{r['recall@10']:>7.3f}{r['index_mb']:>9.1f}{reranked}")
    built = "reused" if filtered["build_s"] is None else f"built in {filtered['build_s']:.0f} s"
    print(f"\nour search on an index directory ({filtered['factory']}, {built}), k={args.k}:")
    print(f"{'':<34}{'passing':>9}{'p50 ms':>9}{'p99 ms':>9}{'x unfiltered':>14}")
    for name, r in filtered["rows"].items():
        print(f"{name:<34}{r['passing']:>9.2%}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['over_unfiltered_p50']:>14.2f}")
    print("opening the index: " + ", ".join(f"{k} {v:.3f} s" for k, v in filtered["open_s"].items()))
    e2e = end_to_end(args.e2e_images) if args.e2e_images else None
    if e2e:
        print(f"indexing {e2e['images']} JPEGs: {e2e['index_images_per_s']:.1f} img/s (encoding alone "
              f"{e2e['encode_only_images_per_s']:.1f} img/s, ratio {e2e['index_over_encode']:.2f}); text query "
              f"p50 {e2e['text_query_p50_ms']:.1f} ms (encoding the text alone {e2e['text_encode_p50_ms']:.1f} ms), "
              f"p99 {e2e['text_query_p99_ms']:.1f} ms")
    out = Path(__file__).parent / "results" / f"search_bench-{args.n}-{args.dim}d.json"
    out.write_text(json.dumps({"n": args.n, "dim": args.dim, "gpus": gpu_count(), "factories": rows,
                               "filtered_search": filtered, "end_to_end": e2e}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
