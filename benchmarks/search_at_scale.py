"""Search at 10M vectors on this machine: an index directory holding N synthetic clustered unit vectors (the
embedding chunks and SQLite records `otclip index` writes), published by `otclip reindex`'s own code within a
memory budget; then, in a fresh process (a server starting), the memory-mapped open, recall@10 against exact
search and single-query latency, at the default nprobe and across a sweep.
Reports build time, peak RAM (anonymous: the heap; the memory-mapped vectors' pages are the page cache's),
disk, and writes benchmarks/results/search_at_scale-N-Dd.json.

  python benchmarks/search_at_scale.py [--n 10000000] [--dim 512] [--max-index-memory 4G] [--dir DIR]
                                       [--measure-again]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 100_000


class PeakMemory:
    """Samples this process's resident memory every 0.2 s: VmRSS (all) and RssAnon (heap, without the pages of
    mapped files, which the kernel may drop and read again)."""

    def __init__(self) -> None:
        self.peak = {"VmRSS": 0, "RssAnon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for line in Path("/proc/self/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in self.peak:
                    self.peak[name] = max(self.peak[name], int(value.split()[0]) * 1024)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fill(root: Path, n: int, dim: int, queries: int) -> tuple[float, np.ndarray]:
    """Write n vectors as the index directory's chunks (item i: key "i") and commit their records; returns the
    seconds taken and the `queries` vectors drawn after them from the same clusters."""
    from search_bench import clustered_blocks
    from tqdm import tqdm

    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.metadata_store import ItemRecord
    from otclip.engine.model_identity import ModelIdentity

    directory = IndexDirectory(root)
    t = time.perf_counter()
    blocks = clustered_blocks(n + queries, dim, block=CHUNK)
    with directory.writing():
        directory.open_for_model("bench", ModelIdentity("bench", "0" * 64), dim)
        directory.ingest_pending()  # creates the store
        for c in tqdm(range(n // CHUNK), desc="writing chunks", unit="chunk"):
            part = next(blocks)
            start = c * CHUNK
            records = [ItemRecord(key=str(start + i), sha256=f"{start + i:064x}", row=i) for i in range(len(part))]
            directory.write_chunk(f"bench-{c:05d}", "images", part, records)
            directory.ingest_chunk(f"bench-{c:05d}")
    return time.perf_counter() - t, np.concatenate(list(blocks))[:queries]


def publish(root: Path, budget: int | None) -> dict:
    from otclip.engine.index_directory import IndexDirectory

    directory = IndexDirectory(root)
    with PeakMemory() as memory, directory.writing():
        t = time.perf_counter()
        side = directory.publish("images", factory="auto", progress=True, max_index_memory=budget)
        seconds = time.perf_counter() - t
    return {"side": side, "seconds": seconds, "peak_rss": memory.peak["VmRSS"], "peak_anon": memory.peak["RssAnon"]}


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best inner products of each query over the (memory-mapped) vectors file, by FAISS's
    blockwise brute force."""
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (np.ascontiguousarray(vectors[s : s + CHUNK]) for s in range(0, len(vectors), CHUNK))
    return knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)[1]


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the open below reads from disk as after a reboot."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(root: Path, queries_file: Path, truth_file: Path, k: int, sweep: list[int]) -> dict:
    """In a fresh process: open the index directory as a server does (memory-mapped), time the first queries,
    then p50/p99 and recall@10 of 1,000 queries at the default nprobe and at each nprobe of the sweep, at each
    re-rank factor, and the same queries again (warm); and the process's memory at the end (its RssFile counts
    the index twice: the searcher's mapping and this function's own)."""
    t = time.perf_counter()
    from otclip.engine.search import IndexSearcher, nearest

    searcher = IndexSearcher(root)
    open_s = time.perf_counter() - t
    queries, truth = np.load(queries_file), np.load(truth_file)
    from search_bench import latencies

    def recall_of(side) -> float:
        found = nearest(side, queries, k)[1]
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))

    first = latencies(lambda q: searcher.search(q[0], k=k), queries[:20])
    ours = latencies(lambda q: searcher.search(q[0], k=k), queries)
    import faiss

    side = searcher.directory.load_side("images", use_gpu=False, mmap=True)
    ivf = faiss.extract_index_ivf(side.index)
    default_nprobe = ivf.nprobe
    rows = []
    for nprobe in sorted(set(sweep) | {default_nprobe}):
        if nprobe > ivf.nlist:
            continue
        ivf.nprobe = nprobe
        hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(hnsw.efSearch, 2 * nprobe)
        lat = latencies(lambda q: nearest(side, q, k), queries)
        rows.append({"nprobe": nprobe, "default": nprobe == default_nprobe, "recall@10": recall_of(side),
                     "p50_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99))})
    ivf.nprobe = default_nprobe
    reranks = []
    for factor in sorted({1, 4, 10, 20, 40, 100, side.rerank}):  # candidates re-scored a result, default nprobe
        wider = side._replace(rerank=factor)
        lat = latencies(lambda q, wider=wider: nearest(wider, q, k), queries[:200])
        reranks.append({"rerank": factor, "default": factor == side.rerank, "recall@10": recall_of(wider),
                        "p50_ms": float(np.median(lat))})
    warm = latencies(lambda q: searcher.search(q[0], k=k), queries)  # the same queries, their pages read
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    held = {name: int(status[name].split()[0]) * 1024 for name in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    return {"open_s": open_s, "served_memory": held, "first_20_p50_ms": float(np.median(first)),
            "first_query_ms": float(first[0]),
            "search_p50_ms": float(np.median(ours)), "search_p99_ms": float(np.percentile(ours, 99)),
            "warm_search_p50_ms": float(np.median(warm)), "warm_search_p99_ms": float(np.percentile(warm, 99)),
            "nlist": ivf.nlist, "rerank": side.rerank, "sweep": rows, "rerank_sweep": reranks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-index-memory", default="4G")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/otclip-scale"),
                    help="the index directory (reused by a later run with the same --n and --dim)")
    ap.add_argument("--sweep", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--measure-again", action="store_true",
                    help="measure the index the last run published again (its build figures kept from the results file)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process's part
    args = ap.parse_args()
    root = args.dir / f"{args.n}-{args.dim}d"
    queries_file, truth_file = root.parent / f"{root.name}-queries.npy", root.parent / f"{root.name}-truth.npy"
    if args.measure:
        print(json.dumps(measure(root, queries_file, truth_file, args.k, args.sweep)))
        return

    out = Path(__file__).parent / "results" / f"search_at_scale-{args.n}-{args.dim}d.json"
    result = json.loads(out.read_text()) if args.measure_again else build(args, root, queries_file, truth_file)
    result["cold_open"] = drop_page_cache()
    child = subprocess.run([sys.executable, __file__, "--measure", "--n", str(args.n), "--dim", str(args.dim),
                            "--k", str(args.k), "--dir", str(args.dir), "--sweep", *map(str, args.sweep)],
                           check=True, capture_output=True, text=True)
    result.update(json.loads(child.stdout.strip().splitlines()[-1]))
    report(result)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def build(args: argparse.Namespace, root: Path, queries_file: Path, truth_file: Path) -> dict:
    """Fill the index directory (unless an earlier run did), publish it within the budget, and find the queries'
    exact neighbours: the build's figures."""
    from otclip.engine.index_directory import IndexDirectory
    from otclip.indexer.commands import parse_size

    budget = parse_size(args.max_index_memory)
    fill_s = None
    if not (root / "manifest.json").exists() or not queries_file.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        fill_s, queries = fill(root, args.n, args.dim, args.queries)
        np.save(queries_file, queries)
    directory = IndexDirectory(root)
    built = publish(root, budget)
    vectors = np.load(directory.side_file("images", ".vectors.npy"), mmap_mode="r")
    t = time.perf_counter()
    np.save(truth_file, exact_neighbours(vectors, np.load(queries_file), args.k))
    exact_s = time.perf_counter() - t
    return {"n": args.n, "dim": args.dim, "queries": args.queries, "budget": budget,
            "factory": built["side"]["factory"], "index_bytes": built["side"]["index_bytes"], "fill_s": fill_s,
            "publish_s": built["seconds"], "publish_peak_rss": built["peak_rss"],
            "publish_peak_anon": built["peak_anon"], "exact_search_s": exact_s,
            "disk": {p.name: p.stat().st_size for p in root.glob("images-*")},
            "directory_bytes": directory.size_on_disk()}


def report(r: dict) -> None:
    from otclip.engine.faiss_indexes import size_text

    print(f"\nn={r['n']} dim={r['dim']}, --max-index-memory {size_text(r['budget'])} -> {r['factory']}: index "
          f"{size_text(r['index_bytes'])}; directory on disk {size_text(r['directory_bytes'])}")
    if r["fill_s"] is not None:
        print(f"writing the chunks and records: {r['fill_s']:.0f} s")
    print(f"publish (copy vectors, train, add, save): {r['publish_s']:.0f} s, peak RAM "
          f"{size_text(r['publish_peak_anon'])} anonymous ({size_text(r['publish_peak_rss'])} resident with mapped "
          "file pages)")
    state = "page cache dropped first" if r["cold_open"] else "page cache warm (not root: could not drop it)"
    print(f"fresh process, {state}: IndexSearcher open {r['open_s']:.2f} s, first query "
          f"{r['first_query_ms']:.0f} ms, first 20 p50 {r['first_20_p50_ms']:.1f} ms")
    print(f"{r['queries']} queries through IndexSearcher.search (re-ranking {r['rerank']}x k from the vectors file): "
          f"first pass p50 {r['search_p50_ms']:.1f} ms, p99 {r['search_p99_ms']:.1f} ms; warm pass p50 "
          f"{r['warm_search_p50_ms']:.1f} ms, p99 {r['warm_search_p99_ms']:.1f} ms")
    held = r["served_memory"]
    print(f"the serving process at the end: {size_text(held['RssAnon'])} anonymous (its mapped files' pages are "
          "the page cache's, given back under pressure)")
    print(f"{'nprobe':>8}{'R@10':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for row in r["sweep"]:
        print(f"{row['nprobe']:>8}{row['recall@10']:>8.3f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
              + ("  (default)" if row["default"] else ""))
    print(f"at nprobe {next(row['nprobe'] for row in r['sweep'] if row['default'])}, candidates re-scored a result:")
    print(f"{'rerank':>8}{'R@10':>8}{'p50 ms':>9}")
    for row in r["rerank_sweep"]:
        print(f"{row['rerank']:>8}{row['recall@10']:>8.3f}{row['p50_ms']:>9.2f}"
              + ("  (default)" if row["default"] else ""))


if __name__ == "__main__":
    main()
