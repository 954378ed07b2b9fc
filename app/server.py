"""`otclip serve`: the UI (app/ui.py) and the HTTP JSON API (app/http_api.py) in one server, over one or more
index directories ("collections"), each model loaded once whatever the number of collections using it.

Result tiles are thumbnails, so the originals are never handed to Gradio: they show wherever the photos live
(Gradio refuses to serve files outside the working and temp directories), and no request can read any other
file; the API serves an original only by the id of an indexed image.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from otclip.engine.index_directory import IndexDirectory
from otclip.engine.running_servers import forget_server, new_instance, record_server
from otclip.engine.search import IndexSearcher
from otclip.engine.threads import apply_thread_budget, thread_budget

from .body_limit import BodyLimit
from .http_api import MOUNT as API_MOUNT
from .http_api import build_api
from .image_uploads import PAGE_SCRIPT
from .immutable_tiles import ImmutableTiles
from .search_app import MAX_UPLOAD_PIXELS, SearchApp
from .ui import build_ui

__all__ = ["serve"]
MAX_UPLOAD = 20 * 1024 * 1024  # bytes of one image, uploaded or inline (base64 in the JSON body)
MAX_BODY = MAX_UPLOAD * 4 // 3 + 1024 * 1024  # base64 grows 4/3; + the JSON around it
CONCURRENT_REQUESTS = 8  # requests in flight (decoding, thumbnails, FAISS); model calls are batched, one at a time


def open_collections(index_dirs: list[str | Path], threads: int | None = None) -> list[IndexSearcher]:
    """One searcher per index directory; an index built with a model already opened for another shares it
    (its exported towers, and its weights when they were loaded)."""
    searchers: list[IndexSearcher] = []
    by_model: dict[str, IndexSearcher] = {}
    for index_dir in index_dirs:
        checksum = IndexDirectory(index_dir).model_identity().checksum
        if checksum in by_model:
            searcher = IndexSearcher(index_dir, shared_from=by_model[checksum])
        else:  # queries through the index's exported towers when it keeps them (text: 17.8 ms against 30 ms)
            searcher = IndexSearcher(index_dir, exported=True, threads=threads)
            searcher.prepare_queries()  # loads the torch model only for a tower the index keeps no export of
            by_model[checksum] = searcher
        searchers.append(searcher)
    return searchers


def collection_names(roots: list[Path]) -> list[str]:
    """Each index directory's folder name, with as many of its parents as tell it from the others' (`c1/p/ix` and
    `c2/p/ix`: one parent had named both `p/ix`, and the second collection replaced the first, in silence)."""
    parts = [Path(root).resolve().parts for root in roots]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]).lstrip("/") for p, d in zip(parts, depth)]
        alike = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not alike:
            return names
        for i in alike:
            depth[i] += 1


def serve(index_dirs: str | Path | list[str | Path], host: str = "127.0.0.1", port: int = 7860,
          report: Path | None = None, block: bool = True, searcher: IndexSearcher | None = None,
          threads: int | None = None, searchers: list[IndexSearcher] | None = None):
    """Start the app over one index directory or several; returns the Blocks (already launched) when
    block=False. `searcher(s)`: already opened ones (tests). `threads`: the model's threads (default: the
    available cores; model calls never overlap, see MicroBatcher)."""
    apply_thread_budget(thread_budget(threads))
    if searchers is None:
        dirs = index_dirs if isinstance(index_dirs, list) else [index_dirs]
        dirs = list(dict.fromkeys(Path(d).resolve() for d in dirs))  # a folder given twice is one collection
        searchers = [searcher] if searcher is not None else open_collections(dirs, threads)
    for opened in searchers:
        opened.prepare_queries()
    model_calls = threading.Lock()  # every collection's model calls: one at a time on the whole budget
    results_dir = _results_dir()
    apps = {name: SearchApp(s, name, model_calls, csv_dir=results_dir)
            for name, s in zip(collection_names([s.directory.root for s in searchers]), searchers)}
    ui = build_ui(apps, report)
    # Gradio's queue recomputes a monitoring summary (a pandas frame of up to 10,000 past events) after every
    # event unless told otherwise: 3 ms a request at first, 8 ms after 10,000, for a dashboard otclip never
    # enables. Read when the queue is made; a user's own setting stays.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))
    ui.queue(default_concurrency_limit=CONCURRENT_REQUESTS, max_size=64)
    # Gradio may serve files from the thumbnails folders (the tiles) and the results folder (the pages' CSVs)
    # only. Static: served where they are, not copied into Gradio's cache per request (12 tiles: 50 -> 29 ms a
    # request; a page's CSV 1.5 ms, and Gradio's cache kept every copy).
    thumbnails = [str(s.directory.thumbnails_dir) for s in searchers]
    gr.set_static_paths([*thumbnails, str(results_dir)])
    # max_threads: Gradio's bound on its worker threads, what bounds the page's unqueued searches (ui.PAGE_EVENT)
    ui.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, prevent_thread_lock=True, head=PAGE_SCRIPT,
              max_threads=CONCURRENT_REQUESTS,
              show_error=True, quiet=not block, allowed_paths=[*thumbnails, str(results_dir)],
              app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=MAX_BODY),
                                         Middleware(ImmutableTiles, folders=thumbnails)]})
    instance = new_instance()
    ui.app.mount(API_MOUNT, build_api(apps, MAX_UPLOAD_PIXELS, instance))  # the HTTP JSON API, beside the UI
    record = _record(host, ui.server_port, instance, {name: app.searcher.directory.root for name, app in apps.items()})
    if record is not None:
        _forget_on_close(ui, record)
    if block:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it as Ctrl-C does: record removed
        try:
            ui.block_thread()
        finally:
            if record is not None:
                forget_server(record)
    return ui


def _results_dir() -> Path:
    """A folder of this server's own for the pages' CSVs, removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="otclip-results-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _forget_on_close(ui: gr.Blocks, record: Path) -> None:
    """A server closed in a process that goes on (`serve(block=False)`, then `close()`) stops being offered to
    `otclip search` at once, not when the process ends: its record would name a port nothing answers on, ahead
    of a live server's. Replaced on the instance, as `inline_gallery` does (no Blocks subclass)."""
    close = ui.close

    def close_and_forget(*args, **kwargs):
        forget_server(record)
        return close(*args, **kwargs)

    ui.close = close_and_forget


def _record(host: str, port: int, instance: str, collections: dict[str, Path]) -> Path | None:
    """Record this server for `otclip search` (`running_servers`), removed when the process ends; a server
    that cannot write the record still serves (terminal searches then open the index themselves)."""
    loopback = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
    try:
        record = record_server(f"http://{loopback}:{port}{API_MOUNT}", port, instance, collections)
    except OSError as exc:
        print(f"otclip serve: `otclip search` will not use this server: {exc}", file=sys.stderr)
        return None
    atexit.register(forget_server, record)
    return record
