"""A FAISS side built by torchrun ranks against the same side built by one process, on this machine: an index
directory of N synthetic clustered unit vectors (search_at_scale.fill), published once by one process (every
list in its RAM) and once under `torchrun --nproc_per_node W` (each rank adds its share and writes a shard; rank 0
merges the shards' lists on disk into the .ivfdata file). Reports each build's time and each process's peak RAM
(anonymous: the heap; resident: with the pages of the mapped files, which are the page cache's), checks that both
indexes hold the same lists, and times a fresh process's open and queries of each. Writes
benchmarks/results/sharded_build-N-Dd.json.

  python benchmarks/sharded_build.py [--n 1000000] [--dim 512] [--factory IVF1024,Flat] [--ranks 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np


def publish(root: Path, factory: str, out: Path) -> None:
    """Every rank's part of a publish (one process when not under torchrun): its time and peak memory, to `out`
    (rank R writes out.R.json)."""
    from search_at_scale import PeakMemory

    from otclip.engine.distributed import init_from_env
    from otclip.engine.index_directory import IndexDirectory

    ranks = init_from_env()
    directory = IndexDirectory(root)
    start_anon = _anon()  # what the process holds before the build: torch.distributed's import in a rank
    with PeakMemory() as memory, (directory.writing() if ranks.is_main else nullcontext()):
        t = time.perf_counter()
        side = directory.publish("images", factory=factory, progress=ranks.is_main, ranks=ranks)
        seconds = time.perf_counter() - t
    ranks.close()
    result = {"rank": ranks.rank, "seconds": seconds, "peak_rss": memory.peak["VmRSS"],
              "peak_anon": memory.peak["RssAnon"], "start_anon": start_anon, "side": side}
    Path(f"{out}.{ranks.rank}.json").write_text(json.dumps(result))


def _anon() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["RssAnon"].split()[0]) * 1024


def serve(root: Path, queries_file: Path) -> dict:
    """In a fresh process: open the side as a server does, search the queries; the answers and the timings."""
    from search_bench import latencies

    t = time.perf_counter()
    from otclip.engine.search import IndexSearcher, nearest

    searcher = IndexSearcher(root)
    side = searcher.directory.load_side("images", use_gpu=False, mmap=True)
    open_s = time.perf_counter() - t
    queries = np.load(queries_file)
    found = nearest(side, queries, 10)[1]
    lat = latencies(lambda q: searcher.search(q[0], k=10), queries)
    return {"open_s": open_s, "search_p50_ms": float(np.median(lat)), "search_p99_ms": float(np.percentile(lat, 99)),
            "served_anon": _anon(), "found": found.tolist()}


def run_publish(root: Path, factory: str, world: int, out: Path) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--publish", "--factory", factory, "--dir", str(root), "--out", str(out)]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", "29531",
               *script]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // world))})
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def run_serve(root: Path, queries_file: Path) -> dict:
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--serve", "--dir", str(root),
                            "--queries-file", str(queries_file)], check=True, capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/otclip-sharded"))
    ap.add_argument("--publish", action="store_true", help=argparse.SUPPRESS)  # a rank's part
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the fresh process's part
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.publish:
        publish(args.dir, args.factory, args.out)
        return
    if args.serve:
        print(json.dumps(serve(args.dir, args.queries_file)))
        return

    from search_at_scale import fill

    from otclip.engine.faiss_indexes import size_text

    root = args.dir / f"{args.n}-{args.dim}d"
    queries_file = args.dir / f"{root.name}-queries.npy"
    if not (root / "manifest.json").exists() or not queries_file.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        _, queries = fill(root, args.n, args.dim, args.queries)
        np.save(queries_file, queries)
    result = {"n": args.n, "dim": args.dim, "factory": args.factory, "ranks": args.ranks, "cpu_count": os.cpu_count()}
    for name, world in (("one_process", 1), ("torchrun", args.ranks)):
        parts = run_publish(root, args.factory, world, args.dir / name)
        side = parts[0]["side"]
        served = run_serve(root, queries_file)
        result[name] = {"ranks": parts, "lists_on_disk": side.get("lists_on_disk", False), "index_bytes": side["index_bytes"],
                        "files": {p.name: p.stat().st_size for p in root.glob("images-*")}, **served}
    one, many = result["one_process"], result["torchrun"]
    result["same_answers"] = one.pop("found") == many.pop("found")

    print(f"\nn={args.n} dim={args.dim} {args.factory}: index {size_text(one['index_bytes'])}; "
          f"{os.cpu_count()} cores shared by the ranks")
    print(f"{'build':<14}{'rank':>5}{'seconds':>9}{'anon at start':>15}{'peak anon':>11}{'peak resident':>15}")
    for name in ("one_process", "torchrun"):
        for part in result[name]["ranks"]:
            print(f"{name:<14}{part['rank']:>5}{part['seconds']:>9.1f}{size_text(part['start_anon']):>15}"
                  f"{size_text(part['peak_anon']):>11}{size_text(part['peak_rss']):>15}")
    for name in ("one_process", "torchrun"):
        r = result[name]
        form = "lists memory-mapped from .ivfdata" if r["lists_on_disk"] else "lists in the .faiss (IO_FLAG_MMAP_IFC)"
        print(f"{name}: {form}; fresh process open {r['open_s']:.2f} s, search p50 {r['search_p50_ms']:.2f} ms, "
              f"p99 {r['search_p99_ms']:.2f} ms, {size_text(r['served_anon'])} anonymous after the queries")
    print(f"the same 10 best for all {args.queries} queries: {result['same_answers']}")
    out = Path(__file__).parent / "results" / f"sharded_build-{args.n}-{args.dim}d.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
