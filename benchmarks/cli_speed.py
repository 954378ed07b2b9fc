"""Terminal speed: cold `otclip search` (text, through the index's exported text tower, against the same
query through torch: `--model`, what every query paid before; and with an `otclip serve` of the index
up, which then answers), no-op `otclip index` on the demo gallery
and on N unchanged files, wall time and peak memory of each process; and the warm text query against
the raw torch text forward in one process, idle and next to a busy process, with OpenMP's default
waiting and with passive waiting. Writes benchmarks/results/cli_speed.json.

  python benchmarks/cli_speed.py [--index demo-index] [--runs 5] [--files 10000]
Run it alone: any other busy process changes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

QUERIES = ["a cat", "a cup of coffee", "a rocket", "galaxies in deep space", "a sneaker"]
LOAD = "import torch\na = torch.randn(1500, 1500)\nwhile True:\n    a @ a\n"  # a busy neighbour on both cores


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def median_of(cmd: list[str], runs: int) -> dict:
    results = [timed(cmd) for _ in range(runs)]
    return {"seconds_median": float(np.median([r[0] for r in results])), "seconds_all": [r[0] for r in results],
            "peak_rss_mb": float(np.median([r[1] for r in results]))}


WARM = r'''
import json, os, sys, time
import numpy as np
from otclip.engine.search import IndexSearcher
from otclip.engine.threads import apply_thread_budget, thread_budget
apply_thread_budget(thread_budget())
queries = json.loads(sys.argv[2])
torch_searcher = IndexSearcher(sys.argv[1])
onnx_searcher = IndexSearcher(sys.argv[1], exported=True)
import torch
model = torch_searcher.model
tokens = [model.tokenizer([q]) for q in queries]
def raw(i):
    with torch.no_grad():
        model.model.encode_text(tokens[i % len(tokens)])
calls = {"raw torch text forward": raw,
         "query through torch (search_text)": lambda i: torch_searcher.search_text(queries[i % len(queries)], k=12),
         "query through the ONNX export (search_text)": lambda i: onnx_searcher.search_text(queries[i % len(queries)], k=12)}
out = {}
for name, fn in calls.items():
    for i in range(5):
        fn(i)
    times = []
    for i in range(40):
        t = time.perf_counter(); fn(i); times.append(time.perf_counter() - t)
    out[name] = float(np.median(times) * 1000)
print(json.dumps(out))
'''


def warm_queries(index: Path, passive: bool, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    load = subprocess.Popen([sys.executable, "-c", LOAD]) if busy else None
    try:
        if load:
            time.sleep(3)
        out = subprocess.run([sys.executable, "-c", WARM, str(index), json.dumps(QUERIES)], capture_output=True,
                             text=True, env=env, check=True, timeout=600).stdout
    finally:
        if load:
            load.kill()
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def serving(index: Path):
    """An `otclip serve` of the index, recorded in a private cache dir (set in os.environ meanwhile, so
    that the `otclip search` processes started find it); waits until it listens and has answered once."""
    from otclip.engine.running_servers import server_for

    with tempfile.TemporaryDirectory(prefix="otclip-servers-") as cache, \
            mock.patch.dict(os.environ, OTCLIP_CACHE_DIR=cache):
        server = subprocess.Popen([sys.executable, "-m", "otclip", "serve", str(index), "--port",
                                   str(7900 + os.getpid() % 90)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while server_for(index) is None:  # recorded once it listens
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"otclip serve {index} did not start")
                time.sleep(0.5)
            subprocess.run([sys.executable, "-m", "otclip", "search", str(index), "warm up"], check=True,
                           capture_output=True)
            yield
        finally:
            server.terminate()
            server.wait(60)


def unchanged_files(n: int, root: Path) -> Path:
    """n files, few distinct contents (copies of the sample photos): indexing them embeds only the distinct
    ones, so the set-up is quick, and re-indexing them is the no-op being measured."""
    from otclip.engine.sample_photos import write_sample_photos

    photos = write_sample_photos(root / "distinct")
    folder = root / "files"
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photos[i % len(photos)], sub / f"{i:06d}.jpg")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=Path("demo-index"))
    ap.add_argument("--data", type=Path, default=Path("data/sample-gallery"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--files", type=int, default=10_000, help="unchanged files for the large no-op re-index (0: skip)")
    ap.add_argument("--clip-model", default="ViT-B-32-256",
                    help="also time cold searches on an index built with this model (rclip's architecture; '' skips)")
    args = ap.parse_args()
    otclip = [sys.executable, "-m", "otclip"]
    if not (args.index / "manifest.json").exists():
        subprocess.run([*otclip, "demo", "--out", str(args.index), "--data", str(args.data), "--no-serve"], check=True)
    gallery = args.data / "gallery.jsonl"
    report: dict = {"cores": len(os.sched_getaffinity(0)), "runs": args.runs}
    report["cold search, text, exported text tower"] = median_of([*otclip, "search", str(args.index), "a cat"], args.runs)
    report["cold search, text, torch (--model)"] = median_of(
        [*otclip, "search", str(args.index), "a cat", "--model", "effnet-minilm"], args.runs)
    photo = str(next(args.data.rglob("*.jpg")).resolve())
    report["cold search, image, exported image tower"] = median_of(
        [*otclip, "search", str(args.index), "--image", photo, "--local"], args.runs)
    report["cold search, image, torch (--model)"] = median_of(
        [*otclip, "search", str(args.index), "--image", photo, "--model", "effnet-minilm"], args.runs)
    with serving(args.index):
        report["search, text, `otclip serve` of the index up"] = median_of(
            [*otclip, "search", str(args.index), "a cat"], args.runs)
        report["search, indexed image, `otclip serve` up"] = median_of(
            [*otclip, "search", str(args.index), "--image", photo], args.runs)
    if args.clip_model:
        with tempfile.TemporaryDirectory(prefix="otclip-clip-") as tmp:
            from otclip.engine.sample_photos import write_sample_photos

            photos = write_sample_photos(Path(tmp) / "photos")[0].parent
            subprocess.run([*otclip, "index", str(photos), "--out", f"{tmp}/index", "--model", args.clip_model,
                            "--no-progress"], check=True, capture_output=True)
            report[f"cold search, text, exported text tower, {args.clip_model}"] = median_of(
                [*otclip, "search", f"{tmp}/index", "a cat"], args.runs)
            with serving(Path(tmp) / "index"):
                report[f"search, text, `otclip serve` up, {args.clip_model}"] = median_of(
                    [*otclip, "search", f"{tmp}/index", "a cat"], args.runs)
            report[f"no-op index, {args.clip_model}"] = median_of(
                [*otclip, "index", str(photos), "--out", f"{tmp}/index", "--model", args.clip_model, "--no-progress"],
                args.runs)
    report["no-op index, demo gallery"] = median_of(
        [*otclip, "index", str(gallery), "--out", str(args.index), "--no-progress"], args.runs)
    if args.files:
        with tempfile.TemporaryDirectory(prefix="otclip-noop-") as tmp:
            folder = unchanged_files(args.files, Path(tmp))
            index = Path(tmp) / "index"
            report[f"first index, {args.files} files ({len(list((Path(tmp) / 'distinct').iterdir()))} distinct)"] = \
                median_of([*otclip, "index", str(folder), "--out", str(index), "--no-progress"], 1)
            report[f"no-op index, {args.files} unchanged files"] = median_of(
                [*otclip, "index", str(folder), "--out", str(index), "--no-progress"], args.runs)
    warm = {}
    for passive in (False, True):
        for busy in (False, True):
            key = f"{'passive' if passive else 'default'} OpenMP waiting, {'busy neighbour' if busy else 'idle'}"
            warm[key] = warm_queries(args.index, passive, busy)
    report["warm text query, median ms"] = warm

    print(f"{'command':<58}{'median s':>10}{'peak MB':>9}")
    for name, r in report.items():
        if isinstance(r, dict) and "seconds_median" in r:
            print(f"{name:<58}{r['seconds_median']:>10.2f}{r['peak_rss_mb']:>9.0f}")
    print(f"\n{'warm text query (ms)':<46}" + "".join(f"{k.split(' (')[0][:22]:>24}" for k in next(iter(warm.values()))))
    for setting, row in warm.items():
        print(f"{setting:<46}" + "".join(f"{v:>24.1f}" for v in row.values()))
    out = Path(__file__).parent / "results" / "cli_speed.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
