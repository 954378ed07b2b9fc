"""The Gradio app: text -> image, image -> text and image -> image search over one index directory.

The model is loaded once (by the IndexSearcher), at start. Requests run concurrently, but model calls go
through one `MicroBatcher` per kind: queries that arrive together share one forward pass, one call
at a time, on the whole thread budget (cores, or --threads): never two calls splitting the cores.
Result tiles are thumbnails the app makes from the paths the index lists, so
the originals are never handed to Gradio: they show wherever the photos live (Gradio refuses to
serve files outside the working and temp directories), and no request can read any other file.
"""

from __future__ import annotations

import datetime
import json
import threading
from pathlib import Path

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

from otclip.engine.batching import MicroBatcher
from otclip.engine.images import ImageDecodeError, load_image, thumbnail
from otclip.engine.search import IndexSearcher, SearchResult
from otclip.engine.threads import apply_thread_budget, thread_budget

from .body_limit import BodyLimit

MAX_UPLOAD = 20 * 1024 * 1024  # bytes of one image, uploaded or inline (base64 in the JSON body)
MAX_BODY = MAX_UPLOAD * 4 // 3 + 1024 * 1024  # base64 grows 4/3; + the JSON around it
MAX_UPLOAD_PIXELS = 40_000_000
ORIGINAL_ROUTE = "/otclip/original/{item_id}"  # an indexed image's original file, by its id; nothing else
CONCURRENT_REQUESTS = 8  # requests in flight (decoding, thumbnails, FAISS); model calls are batched, one at a time
EXAMPLE_QUERIES = ["a cat", "a cup of coffee", "a rocket", "galaxies in deep space", "a sneaker", "a dress"]


def _caption(r: SearchResult) -> str:
    name = Path(r.path).name if r.path else ""
    return f"{r.score:.3f} · {r.text or name}"


class SearchApp:
    """The three searches as plain functions: the UI and the named API endpoints both call these."""

    def __init__(self, searcher: IndexSearcher, report: Path | None = None, max_batch: int = 16) -> None:
        self.searcher = searcher
        self.report = report
        model_calls = threading.Lock()  # texts and images alike: one forward at a time
        self.texts = MicroBatcher(searcher.encode_texts, max_batch, model_calls, "text")
        self.images = MicroBatcher(searcher.encode_images, max_batch, model_calls, "image")

    def _search_text(self, query: str, k: int, min_score: float | None = None) -> list[SearchResult]:
        return self.searcher.search_vectors(self.texts.submit(query), "images", k, min_score)[0]

    def _search_image(self, image: Image.Image, k: int, min_score: float | None = None, target: str = "images"):
        return self.searcher.search_vectors(self.images.submit(image), target, k, min_score)[0]

    def _check_image(self, image) -> Image.Image:
        if image is None:
            raise gr.Error("no image: upload or paste an image, or pick one from the results")
        try:
            return load_image(image if not isinstance(image, str) else Path(image), name="upload",
                              max_pixels=MAX_UPLOAD_PIXELS)
        except ImageDecodeError as exc:
            raise gr.Error(f"{exc}") from None

    def _tile(self, r: SearchResult):
        """The thumbnail `otclip index` kept (a file in the index's thumbnails folder, the only folder
        Gradio may serve), else one made here from the indexed original; never the original itself."""
        kept = self.searcher.thumbnail_file(r)
        return str(kept) if kept is not None else thumbnail(r.path)

    def _gallery(self, results: list[SearchResult], min_score: float) -> tuple[list, str, list[int]]:
        """(tiles, status line, the ids of the indexed images behind the tiles)."""
        if not results:
            return [], f"No results above score {min_score:.2f}. Lower the minimum score.", []
        tiles, ids = [], []
        for r in results:
            try:
                tiles.append((self._tile(r), _caption(r)))
            except ImageDecodeError:  # moved or damaged since it was indexed, and no thumbnail kept
                continue
            ids.append(r.id)
        status = f"{len(tiles)} results"
        if len(tiles) < len(results):
            status += f" ({len(results) - len(tiles)} indexed files could not be read: re-run `otclip index`)"
        return tiles, status, ids

    def text_to_image(self, query: str, k: float = 12, min_score: float = -1.0) -> tuple[list, str, list[int]]:
        if not query or not query.strip():
            raise gr.Error("empty query: type what you are looking for, e.g. 'a cat'")
        results = self._search_text(query.strip()[:500], int(k), float(min_score))
        return self._gallery(results, min_score)

    def image_to_image(self, image, k: float = 12, min_score: float = -1.0) -> tuple[list, str, list[int]]:
        results = self._search_image(self._check_image(image), int(k), float(min_score))
        return self._gallery(results, min_score)

    def image_to_text(self, image, k: float = 5) -> list[list]:
        if not self.searcher.has_side("texts"):
            raise gr.Error("this index has no text side: build one with `otclip index-texts CAPTIONS.txt --out INDEX_DIR`")
        results = self._search_image(self._check_image(image), int(k), target="texts")
        return [[r.rank, round(r.score, 4), r.text] for r in results]

    def index_panel(self) -> str:
        info = self.searcher.info()
        lines = [f"**Model** {info['model']['name']} (weights `{info['model']['checksum'][:12]}`)",
                 f"**Dimension** {info['dim']}, {info['metric']}"]
        for side, s in info["sides"].items():
            when = datetime.datetime.fromtimestamp(s["updated"]).strftime("%Y-%m-%d %H:%M")
            lines.append(f"**{side.capitalize()}** {s['items']} ({s['index_type']}, factory `{s['factory']}`, built {when})")
        if "texts" not in info["sides"]:
            lines.append("No text side: image -> text needs `otclip index-texts`.")
        return "  \n".join(lines)

    def report_markdown(self) -> str:
        if self.report is None:
            return ("Start the app with `--report PATH` (an `otclip eval` JSON or the partial-pairs report) "
                    "to compare models here.")
        report = Path(self.report)
        markdown = report.with_suffix(".md")
        if markdown.exists():  # `otclip eval --md` and the partial-pairs experiment write one beside the JSON
            return markdown.read_text()
        return report_tables(json.loads(report.read_text()))

    def report_plots(self) -> list[str]:
        if self.report is None:
            return []
        report = Path(self.report)
        listed = json.loads(report.read_text()).get("plots")  # the experiment lists its plots' file names
        if listed:
            paths = [report.parent / Path(name).name for name in listed]
            return [str(path) for path in paths if path.exists()]
        return sorted(str(p) for p in report.parent.glob(f"{report.stem}-*.png"))


def report_tables(data: dict) -> str:
    """A report's metrics as Markdown: each {metric: number} block is a row of one table, and each
    {name: {metric: number}} block a table of its own."""
    def numeric(d) -> bool:  # None is a metric that could not be measured
        return isinstance(d, dict) and d and all(v is None or isinstance(v, (int, float)) for v in d.values())

    def cell(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    rows = {k: v for k, v in data.items() if numeric(v)}
    out = []
    if rows:
        metrics = list(dict.fromkeys(m for v in rows.values() for m in v))
        out += ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        out += [f"| {k.replace('_', ' ')} | " + " | ".join(cell(v[m]) if m in v else "" for m in metrics) + " |"
                for k, v in rows.items()]
        out.append("")
    for section, block in data.items():
        if isinstance(block, dict) and block and all(numeric(v) for v in block.values()):
            out.append(f"### {section.replace('_', ' ')}\n")
            out.append(report_tables(block))
    return "\n".join(out) or "The report has no metric tables."


def _image_input(elem_id: str) -> gr.Image:
    """An image query, handed to the app as the uploaded file's path (`image_mode=None`: Gradio decodes nothing),
    so that `load_image` checks the header's size and aspect ratio before any pixel is decoded."""
    return gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], elem_id=elem_id)


def build_ui(app: SearchApp) -> gr.Blocks:
    with gr.Blocks(title="otclip") as ui:
        gr.Markdown("# otclip - text and image search")
        with gr.Accordion("Index", open=False):
            gr.Markdown(app.index_panel())
        with gr.Tab("Text -> image"):
            with gr.Row():
                query = gr.Textbox(label="Query", placeholder="a cat", scale=4, elem_id="query")
                search = gr.Button("Search", variant="primary", scale=1, elem_id="search")
            with gr.Row():
                k = gr.Slider(1, 50, value=12, step=1, label="k")
                min_score = gr.Slider(-1, 1, value=-1, step=0.01, label="minimum score")
            gr.Examples(EXAMPLE_QUERIES, inputs=query)
            status = gr.Markdown(elem_id="t2i-status")
            gallery = gr.Gallery(label="Results", columns=6, height="auto", format="jpeg", elem_id="t2i-gallery")
            last_results = gr.State([])  # the ids of the indexed images behind the gallery, for click-to-search

            outputs = [gallery, status, last_results]
            search.click(app.text_to_image, [query, k, min_score], outputs, api_name="text_to_image")
            query.submit(app.text_to_image, [query, k, min_score], outputs, api_name=False)
        with gr.Tab("Image -> text"):
            image_in = _image_input("i2t-image")
            k_text = gr.Slider(1, 20, value=5, step=1, label="k")
            find_texts = gr.Button("Find texts", variant="primary", elem_id="i2t-search")
            texts = gr.Dataframe(headers=["rank", "score", "text"], label="Texts", elem_id="i2t-texts")
            find_texts.click(app.image_to_text, [image_in, k_text], texts, api_name="image_to_text")
        with gr.Tab("Image -> image"):
            image_q = _image_input("i2i-image")
            find_similar = gr.Button("Find similar", variant="primary", elem_id="i2i-search")
            status_i = gr.Markdown()
            original = gr.Markdown(elem_id="i2i-original")
            gallery_i = gr.Gallery(label="Similar images", columns=6, height="auto", format="jpeg", elem_id="i2i-gallery")
            last_similar = gr.State([])
            find_similar.click(app.image_to_image, [image_q, k, min_score], [gallery_i, status_i, last_similar],
                               api_name="image_to_image")
        with gr.Tab("Evaluation"):
            gr.Markdown(app.report_markdown())
            plots = app.report_plots()
            if plots:
                gr.Gallery(value=plots, label="Plots", columns=2)

        def search_by_result(ids, evt: gr.SelectData):
            """Clicking a result searches by it and links its original; only images the index lists are opened."""
            item = ids[evt.index] if ids and 0 <= evt.index < len(ids) else None
            source = app.searcher.indexed_image(item) if item is not None else None
            if source is None:
                raise gr.Error("that result is no longer in the index")
            try:
                shown = thumbnail(source)
            except ImageDecodeError as exc:
                raise gr.Error(str(exc)) from None
            link = f"[Open the original]({ORIGINAL_ROUTE.format(item_id=item).lstrip('/')}) · {Path(source).name}"
            return (shown, *app.image_to_image(source), link)

        gallery.select(search_by_result, last_results, [image_q, gallery_i, status_i, last_similar, original],
                       api_name=False)
    return ui


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, report: Path | None = None,
          block: bool = True, searcher: IndexSearcher | None = None, threads: int | None = None):
    """Start the app; returns the Blocks (already launched) when block=False. `threads`: the model's
    threads (default: the available cores; model calls never overlap, see MicroBatcher)."""
    apply_thread_budget(thread_budget(threads))
    # text queries through the index's exported text tower when it keeps one (17.8 ms against torch's 30 ms here)
    searcher = searcher or IndexSearcher(index_dir, exported_text=True, threads=threads)
    searcher.load_model()
    ui = build_ui(SearchApp(searcher, report))
    ui.queue(default_concurrency_limit=CONCURRENT_REQUESTS, max_size=64)
    # Gradio may serve files from the thumbnails folder only (the tiles), and the original route only indexed
    # images. Static: served where they are, not copied into Gradio's cache per request (12 tiles: 50 -> 29 ms
    # a request). set_static_paths is per process: a second server in one process has its tiles copied instead.
    thumbnails = str(searcher.directory.thumbnails_dir)
    gr.set_static_paths([thumbnails])
    ui.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, prevent_thread_lock=True,
              show_error=True, quiet=not block, allowed_paths=[thumbnails],
              app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=MAX_BODY)]})
    add_original_route(ui.app, searcher)
    if block:
        ui.block_thread()
    return ui


def add_original_route(server, searcher: IndexSearcher) -> None:
    """GET ORIGINAL_ROUTE: the original file of an indexed image, looked up by its id in the index."""
    from fastapi import HTTPException
    from fastapi.responses import FileResponse

    @server.get(ORIGINAL_ROUTE)
    def original(item_id: int):
        path = searcher.indexed_image(item_id)
        if path is None or not Path(path).is_file():
            raise HTTPException(status_code=404, detail="no indexed image has this id")
        return FileResponse(path)
