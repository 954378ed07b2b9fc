"""Load on the app: N concurrent users on loopback for a bounded time, p50/p99 latency per endpoint and
the error count (must be 0), against the bare search API's latency in the same run.

Each user is, by default, what a browser does: one keep-alive HTTP connection, the upload for image
queries, Gradio's call + event stream, then every result tile fetched. `--client gradio_client` uses
gradio_client instead, which opens new connections for every tile it downloads (about 30 ms each here).

  python benchmarks/app_load.py [--index demo-index] [--users 1 4 16] [--seconds 30] [--client rest|gradio_client]
Builds the demo index first when --index does not exist. Writes benchmarks/results/app_load.json
(app_load-gradio_client.json with that client).
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
    ap.add_argument("--client", choices=["rest", "gradio_client"], default="rest")
    args = ap.parse_args()

    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher
    from otclip.engine.threads import apply_thread_budget, thread_budget

    if not (args.index / "manifest.json").exists():
        from otclip.app.demo import build_demo_index

        build_demo_index(args.index, args.data, progress=False)
    apply_thread_budget(thread_budget())  # what serve() sets: the bare API runs under the same budget
    searcher = IndexSearcher(args.index, exported=True)  # what serve() builds
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

    from gradio_client import Client

    # one user, sequential, without downloading the 12 tiles: Gradio's queue round trip alone
    client = Client(url, verbose=False, download_files=False)
    transport = []
    for i in range(15):
        t = time.perf_counter()
        client.predict(QUERIES[i % len(QUERIES)], 12, -1.0, api_name="/text_to_image")
        transport.append(time.perf_counter() - t)
    round_trip = {"text_to_image_p50_ms_without_tile_downloads": pct(transport[3:], 50),
                  "bare_p50_ms": pct(bare["text_to_image"], 50)}
    print(f"1 user, tiles not downloaded: text_to_image p50 {round_trip['text_to_image_p50_ms_without_tile_downloads']:.0f} ms"
          f" (bare API {round_trip['bare_p50_ms']:.0f} ms)")
    levels = {}
    for users in args.users:
        latencies, errors = run_users(url, users, args.seconds, photo, list(bare), args.client)
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
    out = Path(__file__).parent / "results" / ("app_load.json" if args.client == "rest" else f"app_load-{args.client}.json")
    out.write_text(json.dumps({"seconds": args.seconds, "client": args.client, "cores": os.cpu_count(), "levels": levels,
                               "round_trip": round_trip}, indent=2))
    print(f"wrote {out}")


class RestUser:
    """A browser-like client: one keep-alive connection; uploads, Gradio's call + event stream, then the tiles."""

    def __init__(self, url: str) -> None:
        import httpx

        self.api = url + "gradio_api/"
        self.http = httpx.Client(timeout=120)

    def upload(self, path: str) -> dict:
        with open(path, "rb") as f:
            (uploaded,) = self.http.post(self.api + "upload", files={"files": (Path(path).name, f)}).json()
        return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}

    def call(self, name: str, data: list):
        event = self.http.post(self.api + f"call/{name}", json={"data": data}).json()["event_id"]
        kind = None
        with self.http.stream("GET", self.api + f"call/{name}/{event}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    if kind == "error":
                        raise RuntimeError(line[5:].strip())
                    result = json.loads(line[5:])
                    break
        if name != "image_to_text":
            for tile in result[0]:
                self.http.get(tile["image"]["url"]).raise_for_status()
        return result

    def predict(self, name: str, query: str, photo: str):
        if name == "text_to_image":
            return self.call(name, [query, 12, -1.0])
        if name == "image_to_text":
            return self.call(name, [self.upload(photo), 5])
        return self.call(name, [self.upload(photo), 12, -1.0])


class GradioClientUser:
    def __init__(self, url: str) -> None:
        from gradio_client import Client

        self.client = Client(url, verbose=False)

    def predict(self, name: str, query: str, photo: str):
        from gradio_client import handle_file

        if name == "text_to_image":
            return self.client.predict(query, 12, -1.0, api_name="/text_to_image")
        if name == "image_to_text":
            return self.client.predict(handle_file(photo), 5, api_name="/image_to_text")
        return self.client.predict(handle_file(photo), 12, -1.0, api_name="/image_to_image")


def run_users(url: str, users: int, seconds: float, photo: str, names: list[str], client: str):
    latencies: dict[str, list[float]] = {k: [] for k in names}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def user(u: int) -> None:
        agent = RestUser(url) if client == "rest" else GradioClientUser(url)
        i = u
        while time.time() < deadline:
            name = names[i % 3]
            t = time.perf_counter()
            try:
                agent.predict(name, QUERIES[i % len(QUERIES)], photo)
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
