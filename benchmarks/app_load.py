"""Load on the app: N concurrent gradio_client users on loopback for a bounded time, p50/p99 latency
per endpoint and the error count (must be 0), against the bare search API's latency in the same run.

  python benchmarks/app_load.py [--index demo-index] [--users 1 4 16] [--seconds 30]
Builds the demo index first when --index does not exist. Writes benchmarks/results/app_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from otclip.engine.threads import passive_waiting  # noqa: E402 (before torch is imported, as `otclip serve` does)

passive_waiting()

QUERIES = ["a cat", "a cup of coffee", "a rocket", "galaxies in deep space", "a sneaker", "a dress", "a brick wall"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=Path("demo-index"))
    ap.add_argument("--data", type=Path, default=Path("data/sample-gallery"))
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()

    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher
    from otclip.engine.threads import apply_thread_budget, thread_budget

    if not (args.index / "manifest.json").exists():
        from otclip.app.demo import build_demo_index

        build_demo_index(args.index, args.data, progress=False)
    apply_thread_budget(thread_budget())  # what serve() sets: the bare API runs under the same budget
    searcher = IndexSearcher(args.index)
    searcher.load_model()
    photo = str(next((args.data / "photos").glob("*.jpg")))
    # the bare API, same queries, same process
    bare = {"text_to_image": [], "image_to_text": [], "image_to_image": []}
    for i in range(30):
        query = QUERIES[i % len(QUERIES)]
        for name, call in (("text_to_image", lambda q=query: searcher.search_text(q, k=12)),
                           ("image_to_text", lambda: searcher.search_texts_for_image(photo, k=5)),
                           ("image_to_image", lambda: searcher.search_image(photo, k=12))):
            t = time.perf_counter()
            call()
            bare[name].append(time.perf_counter() - t)
    port = free_port()
    ui = serve(args.index, "127.0.0.1", port, block=False, searcher=searcher)
    url = f"http://127.0.0.1:{port}/"

    def pct(values, q):
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    levels = {}
    for users in args.users:
        latencies, errors = run_users(url, users, args.seconds, photo, list(bare))
        rows = {name: {"requests": len(latencies[name]), "app_p50_ms": pct(latencies[name], 50),
                       "app_p99_ms": pct(latencies[name], 99), "bare_p50_ms": pct(bare[name], 50),
                       "bare_p99_ms": pct(bare[name], 99),
                       "p50_ratio": pct(latencies[name], 50) / pct(bare[name], 50)} for name in bare}
        levels[users] = {"errors": len(errors), "error_samples": errors[:5], "endpoints": rows}
        print(f"\n{users} users for {args.seconds:.0f}s on loopback; errors: {len(errors)}")
        print(f"{'endpoint':<16}{'requests':>9}{'app p50':>9}{'app p99':>9}{'bare p50':>10}{'bare p99':>10}{'p50 x':>7}  (ms)")
        for name, r in rows.items():
            print(f"{name:<16}{r['requests']:>9}{r['app_p50_ms']:>9.0f}{r['app_p99_ms']:>9.0f}{r['bare_p50_ms']:>10.0f}"
                  f"{r['bare_p99_ms']:>10.0f}{r['p50_ratio']:>7.1f}")
        for e in errors[:5]:
            print("error:", e)
    ui.close()
    out = Path(__file__).parent / "results" / "app_load.json"
    out.write_text(json.dumps({"seconds": args.seconds, "cores": os.cpu_count(), "levels": levels}, indent=2))
    print(f"wrote {out}")


def run_users(url: str, users: int, seconds: float, photo: str, names: list[str]):
    from gradio_client import Client, handle_file

    latencies: dict[str, list[float]] = {k: [] for k in names}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def user(u: int) -> None:
        client = Client(url, verbose=False)
        i = u
        while time.time() < deadline:
            name = names[i % 3]
            t = time.perf_counter()
            try:
                if name == "text_to_image":
                    client.predict(QUERIES[i % len(QUERIES)], 12, -1.0, api_name="/text_to_image")
                elif name == "image_to_text":
                    client.predict(handle_file(photo), 5, api_name="/image_to_text")
                else:
                    client.predict(handle_file(photo), 12, -1.0, api_name="/image_to_image")
                with lock:
                    latencies[name].append(time.perf_counter() - t)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
            i += 1

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors


if __name__ == "__main__":
    main()
