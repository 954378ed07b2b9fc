"""One collection's searches as plain functions: what the UI, its named Gradio endpoints and the HTTP JSON API
call. Model calls go through two `MicroBatcher`s (texts, images) whose calls never overlap each other, nor
those of any other collection's batchers (one lock per server): queries that arrive together share one
forward pass on the whole thread budget, never several passes splitting the cores.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from otclip.engine.batching import MicroBatcher
from otclip.engine.filters import Filters
from otclip.engine.images import ImageDecodeError, load_image, thumbnail
from otclip.engine.query_language import QueryError, Term, combine, parse_query
from otclip.engine.result_export import results_csv
from otclip.engine.search import IndexSearcher
from otclip.engine.search_results import SearchPage, SearchResult

from . import example_queries

MAX_UPLOAD_PIXELS = 40_000_000
# a page's "Results as CSV" stays downloadable this long after its search, unless CSV_FILES_KEPT newer ones were
# written since (a few kB each): a long-running server does not fill the disk with them
CSV_KEEP_SECONDS = 3600
CSV_FILES_KEPT = 4096


def _caption(r: SearchResult) -> str:
    name = Path(r.path).name if r.path else ""
    return f"{r.score:.3f} · {r.text or name}"


class SearchApp:
    _clock = staticmethod(time.time)  # when a CSV was written (a test sets its own)

    def __init__(self, searcher: IndexSearcher, name: str = "", model_calls: threading.Lock | None = None,
                 max_batch: int = 16, csv_dir: Path | None = None) -> None:
        """`csv_dir`: where result lists are written for download (default: the temp directory)."""
        self.searcher, self.name = searcher, name or searcher.directory.root.name
        model_calls = model_calls or threading.Lock()  # texts and images alike: one forward at a time
        self.texts = MicroBatcher(searcher.encode_texts, max_batch, model_calls, "text")
        self.images = MicroBatcher(searcher.encode_images, max_batch, model_calls, "image")
        self.csv_dir = csv_dir
        self._csv_files: deque[tuple[float, str]] = deque()  # (when written, path), oldest first
        self._csv_lock = threading.Lock()
        self._examples: tuple[object, list[str]] | None = None  # (the index generation, its example queries)
        self._examples_lock = threading.Lock()

    # --- the engine's search, batched ----------------------------------------------------------
    def query_vector(self, terms: list[Term]) -> np.ndarray:
        """The query's vector, each term's embedding computed through the batchers."""
        return combine(terms, lambda texts: np.stack([self.texts.submit(t) for t in texts]),
                       lambda images: np.stack([self.images.submit(i) for i in images]))

    def search(self, terms: list[Term], target: str = "images", k: int = 10, offset: int = 0,
               min_score: float | None = None, filters: Filters | None = None, order: str = "score",
               collapse: float | None = None) -> SearchPage:
        """`IndexSearcher.search`, its model calls batched."""
        return self.searcher.search(self.query_vector(terms), target, k, offset, min_score, filters, order, collapse)

    def terms(self, query: str | None, image=None) -> list[Term]:
        """A typed query (its image terms: images the index lists) plus an uploaded image; gr.Error if bad."""
        try:
            terms = parse_query(query, allowed_image=self.searcher.lists_image) if query and query.strip() else []
        except QueryError as exc:
            raise gr.Error(str(exc)) from None
        if image is not None:
            terms.append(Term("image", self.check_image(image)))
        if not terms:
            raise gr.Error("empty query: type what you are looking for, e.g. 'a cat', or give an image")
        return terms

    def check_image(self, image) -> Image.Image:
        """An uploaded image (its path, in Gradio's upload folder under the upload's name) decoded; gr.Error naming the
        upload as the user named it if it is not one."""
        if image is None:
            raise gr.Error("no image: upload or paste an image, or pick one from the results")
        source, name = (Path(image), Path(image).name) if isinstance(image, str) else (image, "upload")
        try:
            return load_image(source, name=name, draft=self.searcher.image_draft, max_pixels=MAX_UPLOAD_PIXELS)
        except ImageDecodeError as exc:
            raise gr.Error(f"{exc}") from None

    # --- what the UI shows -------------------------------------------------------------------------
    def examples(self) -> list[str]:
        """The queries the page offers for this collection (`example_queries.suggest`), chosen again only when the
        index has a new generation (a watched or re-indexed collection that grew offers its new subjects), the model
        call under the server's model lock as any other."""
        with self._examples_lock:
            generation = self.searcher.generation()
            if self._examples is None or self._examples[0] != generation:
                with self.texts.lock:
                    self._examples = generation, example_queries.suggest(self.searcher)
            return self._examples[1]

    def _tile(self, r: SearchResult):
        """The thumbnail `otclip index` kept (a file in the index's thumbnails folder, the only folder
        Gradio may serve), else one made here from the indexed original; never the original itself."""
        kept = self.searcher.thumbnail_file(r.sha256)
        return str(kept) if kept is not None else thumbnail(r.path)

    def gallery(self, results: list[SearchResult], min_score: float) -> tuple[list, str, list[int]]:
        """(tiles, status line, the ids of the indexed images behind the tiles)."""
        if not results:
            return [], f"No results above score {min_score:.2f} (or passing the filters).", []
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

    def csv_file(self, results: list[SearchResult]) -> str:
        """The results as a CSV file in `csv_dir` under a random name (`otclip serve` has Gradio serve that
        folder where it is, rather than copy each file into its cache). Files older than CSV_KEEP_SECONDS, or
        beyond the latest CSV_FILES_KEPT, are deleted."""
        with tempfile.NamedTemporaryFile("w", suffix=".csv", prefix="otclip-results-", delete=False,
                                         encoding="utf-8", dir=self.csv_dir) as f:
            f.write(results_csv(results))
        now = self._clock()
        with self._csv_lock:
            self._csv_files.append((now, f.name))
            while len(self._csv_files) > CSV_FILES_KEPT or self._csv_files[0][0] < now - CSV_KEEP_SECONDS:
                Path(self._csv_files.popleft()[1]).unlink(missing_ok=True)
        return f.name

    # --- the named Gradio endpoints (stable signatures for gradio_client) --------------------------
    def text_to_image(self, query: str, k: float = 12, min_score: float = -1.0) -> tuple[list, str, list[int]]:
        page = self.search(self.terms((query or "")[:500]), "images", int(k), min_score=float(min_score))
        return self.gallery(page.results, min_score)

    def image_to_image(self, image, k: float = 12, min_score: float = -1.0) -> tuple[list, str, list[int]]:
        page = self.search([Term("image", self.check_image(image))], "images", int(k), min_score=float(min_score))
        return self.gallery(page.results, min_score)

    def image_to_text(self, image, k: float = 5) -> list[list]:
        if not self.searcher.has_side("texts"):
            raise gr.Error("this index has no text side: build one with `otclip index-texts CAPTIONS.txt --out INDEX_DIR`")
        page = self.search([Term("image", self.check_image(image))], "texts", int(k))
        return [[r.rank, round(r.score, 4), r.text] for r in page.results]
