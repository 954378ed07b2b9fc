"""Load on the app: N concurrent users on loopback for a bounded time, p50/p99 latency per endpoint and
the error count (must be 0), against the bare search API.

The server is a real `otclip serve` process; the users run in another process (as browsers do), so that
the measurement is not the load generator's own Python competing for the server's interpreter lock.
Each user is, by default, what a browser tab does: one Gradio session, at most 6 keep-alive connections,
the upload for image queries, the page's own search event called as Gradio's page script calls it (see
BrowserUser), then the result tiles that are not inline fetched in parallel. Two latencies per request:
until the results arrive, and until every tile is loaded (the page is done). `--client gradio_client` calls
the named endpoints with gradio_client instead (new connections for every tile it downloads).

The bare API, two ways: the searcher called in this process before the server starts (idle, one call at a
time), and the server's HTTP JSON API (`/api/search`, no tiles) under the same number of users.

Gradio's floor: a page event that does nothing (a query box in, an empty gallery out; the text page's event
settings and the server's launch settings) in a Gradio server of its own, under the same users: what any
Gradio page costs on this machine before otclip searches anything.

  python benchmarks/app_load.py [--index demo-index] [--users 1 4 16] [--seconds 30] [--client rest|gradio_client]
Builds the demo index first when --index does not exist. Writes benchmarks/results/app_load.json
(app_load-gradio_client.json with that client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from otclip.engine.threads import passive_waiting  # noqa: E402 (before torch is imported, as `otclip serve` does)

passive_waiting()

QUERIES = ["a cat", "a cup of coffee", "a rocket", "galaxies in deep space", "a sneaker", "a dress", "a brick wall"]
ENDPOINTS = ["text_to_image", "image_to_text", "image_to_image"]
BROWSER_CONNECTIONS = 6  # what browsers open per host over HTTP/1.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=Path("demo-index"))
    ap.add_argument("--data", type=Path, default=Path("data/sample-gallery"))
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--client", choices=["rest", "gradio_client"], default="rest")
    ap.add_argument("--generate", help=argparse.SUPPRESS)  # internal: run the users against this URL, print JSON
    ap.add_argument("--target", choices=["app", "api", "floor"], default="app", help=argparse.SUPPRESS)
    ap.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)  # internal: serve the floor page on this port
    ap.add_argument("--photo", help=argparse.SUPPRESS)
    ap.add_argument("--collection", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_server:
        serve_floor(args.floor_server)
        return
    if args.generate:
        print(json.dumps(generate(args.generate, args.target, args.client, args.users[0], args.seconds, args.photo,
                                  args.collection)))
        return

    if not (args.index / "manifest.json").exists():
        from otclip.app.demo import build_demo_index

        build_demo_index(args.index, args.data, progress=False)
    photo = str(next((args.data / "photos").glob("*.jpg")))
    bare = bare_in_process(args.index, photo)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server writing more than a pipe holds would block
    server = subprocess.Popen([sys.executable, "-m", "otclip", "serve", str(args.index), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        collection = wait_for(url, server, log)
        round_trip = gradio_round_trip(url, collection, bare)
        levels = {users: run_level(url, users, args, photo, collection, bare) for users in args.users}
    finally:
        server.terminate()
        server.wait(30)
    if args.client == "rest":
        gradio_floor(levels, args)
    out = Path(__file__).parent / "results" / ("app_load.json" if args.client == "rest" else f"app_load-{args.client}.json")
    out.write_text(json.dumps({"seconds": args.seconds, "client": args.client, "cores": os.cpu_count(),
                               "separate_processes": True, "levels": levels, "round_trip": round_trip}, indent=2))
    print(f"wrote {out}")


def bare_in_process(index: Path, photo: str) -> dict[str, list[float]]:
    """The searcher `otclip serve` builds (exported towers, its thread budget), called directly, one call at a time."""
    from otclip.engine.search import IndexSearcher
    from otclip.engine.threads import apply_thread_budget, thread_budget

    apply_thread_budget(thread_budget())
    searcher = IndexSearcher(index, exported=True)
    searcher.prepare_queries()
    bare: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    for i in range(33):
        query = QUERIES[i % len(QUERIES)]
        for name, call in (("text_to_image", lambda q=query: searcher.search_text(q, k=12)),
                           ("image_to_text", lambda: searcher.search_texts_for_image(photo, k=5)),
                           ("image_to_image", lambda: searcher.search_image(photo, k=12))):
            t = time.perf_counter()
            call()
            if i >= 3:  # first calls warm the sessions up
                bare[name].append(time.perf_counter() - t)
    return bare


def wait_for(url: str, server: subprocess.Popen, log) -> str:
    """The first collection's name, once the server answers."""
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"otclip serve exited: {log.read()[-2000:]}")
        try:
            answer = httpx.get(url + "api/collections", timeout=2)
            if answer.status_code == 200:  # Gradio answers 404 until the API is mounted beside it
                return answer.json()[0]
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("otclip serve did not answer within 180 s")


def gradio_round_trip(url: str, collection: str, bare: dict) -> dict:
    """One user, sequential, without downloading the tiles: Gradio's queue round trip alone (gradio_client)."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    times = []
    for i in range(18):
        t = time.perf_counter()
        client.predict(QUERIES[i % len(QUERIES)], 12, -1.0, collection, api_name="/text_to_image")
        times.append(time.perf_counter() - t)
    row = {"text_to_image_p50_ms_without_tile_downloads": pct(times[3:], 50), "bare_p50_ms": pct(bare["text_to_image"], 50)}
    print(f"gradio_client, 1 user, tiles not downloaded: text_to_image p50 "
          f"{row['text_to_image_p50_ms_without_tile_downloads']:.0f} ms (bare API in process {row['bare_p50_ms']:.0f} ms)")
    return row


def generated(url: str, target: str, users: int, args, photo: str, collection: str) -> dict:
    """`users` users on `target` for --seconds, from a generator process of its own."""
    command = [sys.executable, __file__, "--generate", url, "--target", target, "--client", args.client,
               "--users", str(users), "--seconds", str(args.seconds), "--photo", photo, "--collection", collection]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_level(url: str, users: int, args, photo: str, collection: str, bare: dict) -> dict:
    """The app and the HTTP API, each under `users` users."""
    app, api = (generated(url, target, users, args, photo, collection) for target in ("app", "api"))
    rows = {}
    for name in ENDPOINTS:
        loaded, results = app["loaded"][name], app["results"][name]
        rows[name] = {"requests": len(loaded), "app_p50_ms": pct(loaded, 50), "app_p99_ms": pct(loaded, 99),
                      "app_results_p50_ms": pct(results, 50), "http_api_p50_ms": pct(api["results"][name], 50),
                      "http_api_p99_ms": pct(api["results"][name], 99), "bare_p50_ms": pct(bare[name], 50),
                      "bare_p99_ms": pct(bare[name], 99)}
        rows[name]["p50_ratio"] = rows[name]["app_p50_ms"] / rows[name]["bare_p50_ms"]
        rows[name]["p50_ratio_http_api"] = rows[name]["app_p50_ms"] / rows[name]["http_api_p50_ms"]
    errors = app["errors"] + api["errors"]
    print(f"\n{users} users for {args.seconds:.0f}s on loopback ({args.client}); errors: {len(errors)}")
    print(f"{'endpoint':<16}{'requests':>9}{'results':>9}{'p50':>7}{'p99':>7}{'API p50':>9}{'bare p50':>10}"
          f"{'x bare':>8}{'x API':>7}  (ms; p50/p99: results and tiles loaded)")
    for name, r in rows.items():
        print(f"{name:<16}{r['requests']:>9}{r['app_results_p50_ms']:>9.0f}{r['app_p50_ms']:>7.0f}{r['app_p99_ms']:>7.0f}"
              f"{r['http_api_p50_ms']:>9.0f}{r['bare_p50_ms']:>10.0f}{r['p50_ratio']:>8.1f}{r['p50_ratio_http_api']:>7.1f}")
    for e in errors[:5]:
        print("error:", e)
    return {"errors": len(errors), "error_samples": errors[:5], "endpoints": rows}


def serve_floor(port: int) -> None:
    """The floor page (module docstring): served until the process is terminated."""
    import gradio as gr

    from otclip.app.server import CONCURRENT_REQUESTS
    from otclip.app.ui import PAGE_EVENT

    with gr.Blocks() as page:
        query = gr.Textbox(elem_id="query")
        gallery = gr.Gallery()
        for button in UI_BUTTONS.values():  # the page script's three search buttons, each doing nothing
            gr.Button(elem_id=button).click(lambda q: [], query, gallery, **PAGE_EVENT)
    page.queue(default_concurrency_limit=CONCURRENT_REQUESTS, max_size=64)
    page.launch(server_name="127.0.0.1", server_port=port, max_threads=CONCURRENT_REQUESTS, quiet=True)


def gradio_floor(levels: dict, args) -> None:
    """Each level's text page beside the floor page under the same users (rows gain `gradio_floor_p50_ms`)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the floor page did not start")
            time.sleep(0.5)
        print(f"\nGradio's floor (a page event that does nothing, {args.seconds:.0f}s a level) against the text page")
        print(f"{'users':>5}{'floor p50':>11}{'page p50':>10}{'bare p50':>10}{'page - floor':>14}  (ms)")
        for users, level in levels.items():
            floor = generated(url, "floor", users, args, "", "")
            row = level["endpoints"]["text_to_image"]
            row["gradio_floor_p50_ms"] = pct(floor["loaded"]["text_to_image"], 50)
            row["gradio_floor_p99_ms"] = pct(floor["loaded"]["text_to_image"], 99)
            level["errors"] += len(floor["errors"])
            print(f"{users:>5}{row['gradio_floor_p50_ms']:>11.1f}{row['app_p50_ms']:>10.1f}{row['bare_p50_ms']:>10.1f}"
                  f"{row['app_p50_ms'] - row['gradio_floor_p50_ms']:>14.1f}")
    finally:
        server.terminate()
        server.wait(30)


# --- the load generator (its own process) ---------------------------------------------------------------------

def generate(url: str, target: str, client: str, users: int, seconds: float, photo: str, collection: str) -> dict:
    if client == "gradio_client" and target == "app":
        return _threads_as_users(url, users, seconds, photo, collection)
    return asyncio.run(_browser_users(url, target, users, seconds, photo, collection))


UI_BUTTONS = {"text_to_image": "search", "image_to_text": "i2t-search", "image_to_image": "i2i-search"}
QUERY_INPUTS = ("query", "i2t-image", "i2i-image")  # the inputs a user fills in; the others keep the page's values


@dataclass
class PageEvent:
    """The event a search button runs on the page, from Gradio's /config: its fn_index, trigger, whether it is
    queued, and its inputs as (elem_id, the value the page starts with)."""

    fn: int
    trigger: int
    queued: bool
    inputs: list[tuple[str | None, object]]


def ui_events(url: str) -> dict[str, PageEvent]:
    import httpx

    config = httpx.get(url + "config", timeout=30).json()
    components = {c["id"]: c["props"] for c in config["components"]}
    for c in config["components"]:
        if c["type"] == "textbox" and c["props"].get("value") is None:
            c["props"]["value"] = ""  # what the page holds (and sends) for an empty text box
    ids = {props.get("elem_id"): i for i, props in components.items()}
    events = {}
    for name, button in UI_BUTTONS.items():
        trigger = ids[button]
        (event,) = [d for d in config["dependencies"] if [trigger, "click"] in [list(t) for t in d["targets"]]]
        inputs = [(components[i].get("elem_id"), components[i].get("value")) for i in event["inputs"]]
        events[name] = PageEvent(event["id"], trigger, event.get("queue") is not False, inputs)
    return events


class BrowserUser:
    """A browser tab: one Gradio session, at most 6 keep-alive connections; each search is the page's own
    event (the button's function, its inputs as the page sends them) called as Gradio's page script calls
    it (a queued event: queue/join, then the session's event stream; an unqueued one: one POST to
    run/predict), then the tiles that are not inline fetched in parallel."""

    def __init__(self, http, url: str, collection: str, events: dict[str, PageEvent]) -> None:
        self.http, self.url, self.collection, self.events = http, url, collection, events
        self.api = url + "gradio_api/"
        self.session = uuid.uuid4().hex[:11]

    async def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            response = await self.http.post(self.api + "upload", files={"files": (Path(path).name, f.read())})
        (uploaded,) = response.json()
        return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}

    async def call(self, name: str, query: str | Path) -> tuple[float, float]:
        """(seconds until the results arrived, until the tiles were loaded): the query (a text, or a photo
        uploaded first) and this user's collection, every other input as the page starts."""
        t = time.perf_counter()
        event = self.events[name]
        filled = {"collection": self.collection}
        for elem_id, _ in event.inputs:
            if elem_id in QUERY_INPUTS:
                filled[elem_id] = await self.upload(query) if isinstance(query, Path) else query
        data = [filled.get(elem_id, value) for elem_id, value in event.inputs]
        body = {"data": data, "event_data": None, "fn_index": event.fn, "trigger_id": event.trigger,
                "session_hash": self.session}
        result = await (self.queued(body) if event.queued else self.unqueued(body))
        got = time.perf_counter() - t
        if name != "image_to_text":
            await self.tiles([tile["image"]["url"] for tile in result[0]])
        return got, time.perf_counter() - t

    async def unqueued(self, body: dict) -> list:
        answer = await self.http.post(self.api + "run/predict", json=body)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")
        return answer.json()["data"]

    async def queued(self, body: dict) -> list:
        joined = await self.http.post(self.api + "queue/join", json=body)
        joined.raise_for_status()
        event = joined.json()["event_id"]
        async with self.http.stream("GET", self.api + "queue/data", params={"session_hash": self.session}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") == event and message.get("msg") == "process_completed":
                    if not message.get("success"):
                        raise RuntimeError(str(message.get("output"))[:300])
                    return message["output"]["data"]
        raise RuntimeError("the event stream ended without a result")

    async def tiles(self, urls: list[str]) -> None:
        """The tiles a browser would request: inline (`data:`) ones are in the results already."""
        fetched = [u if u.startswith("http") else self.url + u.lstrip("/") for u in urls if not u.startswith("data:")]
        for response in await asyncio.gather(*(self.http.get(u) for u in fetched)):
            response.raise_for_status()

    async def predict(self, name: str, query: str, photo: str) -> tuple[float, float]:
        return await self.call(name, query if name == "text_to_image" else Path(photo))


class ApiUser(BrowserUser):
    """The bare HTTP JSON API: the results only (no tiles)."""

    async def predict(self, name: str, query: str, photo: str) -> tuple[float, float]:
        t = time.perf_counter()
        params = {"collection": self.collection, "k": 5 if name == "image_to_text" else 12,
                  "target": "texts" if name == "image_to_text" else "images"}
        if name == "text_to_image":
            response = await self.http.get(self.url + "api/search", params={**params, "q": query})
        else:
            with open(photo, "rb") as f:
                response = await self.http.post(self.url + "api/search", params=params,
                                                files={"image": (Path(photo).name, f.read())})
        response.raise_for_status()
        elapsed = time.perf_counter() - t
        return elapsed, elapsed


async def _browser_users(url: str, target: str, users: int, seconds: float, photo: str, collection: str) -> dict:
    import httpx

    results: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    loaded: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    errors: list[str] = []
    deadline = time.time() + seconds
    events = ui_events(url)

    async def user(u: int) -> None:
        limits = httpx.Limits(max_connections=BROWSER_CONNECTIONS, max_keepalive_connections=BROWSER_CONNECTIONS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            agent = (ApiUser if target == "api" else BrowserUser)(http, url, collection, events)
            i = u
            while time.time() < deadline:
                name = "text_to_image" if target == "floor" else ENDPOINTS[i % 3]  # the floor page: a text query
                try:
                    got, done = await agent.predict(name, QUERIES[i % len(QUERIES)], photo)
                    if i >= u + 3:  # each user's first three requests open connections and sessions
                        results[name].append(got)
                        loaded[name].append(done)
                except Exception as exc:  # counted and reported, never hidden
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                i += 1

    await asyncio.gather(*(user(u) for u in range(users)))
    return {"results": results, "loaded": loaded, "errors": errors}


def _threads_as_users(url: str, users: int, seconds: float, photo: str, collection: str) -> dict:
    """gradio_client users (it blocks, so one thread each); it downloads every tile it is given."""
    from gradio_client import Client, handle_file

    loaded: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def user(u: int) -> None:
        client = Client(url, verbose=False)
        i = u
        while time.time() < deadline:
            name = ENDPOINTS[i % 3]
            t = time.perf_counter()
            try:
                if name == "text_to_image":
                    client.predict(QUERIES[i % len(QUERIES)], 12, -1.0, collection, api_name="/text_to_image")
                elif name == "image_to_text":
                    client.predict(handle_file(photo), 5, collection, api_name="/image_to_text")
                else:
                    client.predict(handle_file(photo), 12, -1.0, collection, api_name="/image_to_image")
                with lock:
                    loaded[name].append(time.perf_counter() - t)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
            i += 1

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": loaded, "loaded": loaded, "errors": errors}


if __name__ == "__main__":
    main()
