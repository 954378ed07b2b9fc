"""The search API over an index directory: what the CLI and the app call; nothing else opens indexes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import IndexDirectoryError
from .faiss_indexes import index_description
from .images import ImageInput
from .index_directory import IndexDirectory

if TYPE_CHECKING:
    from .encoding import Encoder
    from .model_loading import LoadedModel


@dataclass
class SearchResult:
    rank: int
    score: float
    id: int
    path: str | None = None  # images
    sha256: str | None = None  # the content's digest (names its thumbnail)
    text: str | None = None  # texts, or an image's caption
    label: str | None = None
    width: int | None = None
    height: int | None = None
    duplicates: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != [] and v != {}}


class IndexSearcher:
    """Answers text/image queries against an index directory. The model is loaded once, on the first query
    that needs it (or by `load_model()`): `info` and, with `exported_text=True`, text queries answered by
    the index's exported text tower (`text_query_model`) never load it, nor import torch."""

    def __init__(self, index_dir: str | Path, model: LoadedModel | None = None, device: str | None = None,
                 exported_text: bool = False, threads: int | None = None, few_queries: bool = False) -> None:
        """`few_queries`: this process answers a query or two and exits (the CLI): start fast over run fast."""
        self.directory = IndexDirectory(index_dir)
        manifest = self.directory.manifest()
        if model is not None:
            self.directory.check_model(model.identity)
        self._model, self._device, self._threads = model, device, threads
        self._encoder: Encoder | None = None
        self._loading = threading.Lock()
        self._text_model = None
        if exported_text and model is None:
            files = self.directory.text_query_model_files()
            if files is not None:
                from .text_query_model import TextQueryModel

                self._text_model = TextQueryModel(*files, threads=threads, few_queries=few_queries)
        self.manifest = manifest
        self._sides = {side: self.directory.load_side(side) for side in manifest["sides"]}
        self._stamp = self._manifest_stamp()
        self._reload = threading.Lock()
        self._store = self.directory.reader()
        self._store_inode = _inode(self._store.path)

    @property
    def encoder(self) -> Encoder:
        """The torch encoder, loading the index's model on first use (checked against the index)."""
        if self._encoder is None:
            with self._loading:
                if self._encoder is None:
                    from .encoding import Encoder
                    from .model_loading import load_model
                    from .threads import apply_thread_budget, thread_budget

                    apply_thread_budget(thread_budget(self._threads))
                    model = self._model or load_model(self.manifest["model"]["spec"], device=self._device)
                    self.directory.check_model(model.identity)
                    self._model, self._encoder = model, Encoder(model)
        return self._encoder

    @property
    def model(self) -> LoadedModel:
        return self.encoder.loaded

    def load_model(self) -> None:
        """Load the model now (a server does, so that its first query is not the slow one)."""
        self.encoder  # noqa: B018

    def _manifest_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.directory.manifest_path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def current_sides(self) -> dict:
        """The FAISS sides of the newest published generation. manifest.json is the commit point of every
        (re-)index and is replaced atomically, so a changed stamp means a new generation: it is loaded at
        the next query, with no restart; a request already running keeps the snapshot it started with.
        If a newer publish removed the files meanwhile, the old snapshot serves until the next query.
        A metadata store rebuilt by `otclip repair` (a new file: new ids) is opened with the sides published
        after it, never before them."""
        stamp = self._manifest_stamp()
        if stamp is not None and stamp != self._stamp:
            with self._reload:
                if stamp != self._stamp:
                    try:
                        manifest = self.directory.manifest()
                        sides = {side: self.directory.load_side(side) for side in manifest["sides"]}
                    except IndexDirectoryError:  # every failure to read the index directory is one of these
                        return self._sides
                    if _inode(self.directory.store_path) != self._store_inode:
                        self._store = self.directory.reader()  # requests in flight keep the old connection
                        self._store_inode = _inode(self._store.path)
                    self.manifest, self._sides, self._stamp = manifest, sides, stamp
        return self._sides

    def has_side(self, side: str) -> bool:
        return self.current_sides().get(side) is not None

    def info(self) -> dict:
        current = self.current_sides()
        sides = {
            side: {**self.manifest["sides"][side], "index_type": index_description(loaded[0]),
                   "items": self._store.count(side)}  # reads the store: a damaged one says so here
            for side, loaded in current.items()
            if loaded is not None
        }
        return {
            "index_dir": str(self.directory.root),
            "model": self.manifest["model"],
            "dim": self.manifest["dim"],
            "metric": self.manifest["metric"],
            "sides": sides,
            "size_bytes": self.directory.size_on_disk(),
        }

    # --- vectors -----------------------------------------------------------------------------
    def search_vectors(
        self, queries: np.ndarray, side: str = "images", k: int = 10, min_score: float | None = None
    ) -> list[list[SearchResult]]:
        """Nearest items of `side` for each (d,) query vector (rows of `queries`)."""
        loaded = self.current_sides().get(side)
        if loaded is None:
            hint = "otclip index-texts TEXTS --out DIR" if side == "texts" else "otclip index IMAGES --out DIR"
            raise IndexDirectoryError(f"{self.directory.root}: has no {side} side; build it with `{hint}`")
        if k < 1:
            raise ValueError(f"k={k}: must be at least 1")
        index, ids = loaded
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, positions = index.search(queries, min(k, max(1, index.ntotal)))
        found = [[(float(s), int(ids[p])) for s, p in zip(row_s, row_p) if p >= 0 and (min_score is None or s >= min_score)]
                 for row_s, row_p in zip(scores, positions)]
        meta = self._store.items(sorted({i for row in found for _, i in row}))
        found = [[(score, i) for score, i in row if i in meta] for row in found]  # rows removed since this snapshot
        return [[self._result(rank, score, meta[i], side) for rank, (score, i) in enumerate(row, 1)] for row in found]

    @staticmethod
    def _result(rank: int, score: float, item: dict, side: str) -> SearchResult:
        return SearchResult(
            rank=rank, score=score, id=item["id"],
            path=item["key"] if side == "images" else None, sha256=item["sha256"] if side == "images" else None,
            text=item["text"], label=item["label"], width=item["width"], height=item["height"],
            duplicates=item["duplicates"], extra=item["extra"],
        )

    # --- queries -----------------------------------------------------------------------------
    def encode_texts(self, queries: Sequence[str]) -> np.ndarray:
        """(n, d) query vectors, through the exported text tower when this searcher uses it."""
        queries = list(queries)
        for q in queries:
            if not q or not q.strip():
                raise ValueError("empty query: type some words to search for")
        return (self._text_model or self.encoder).encode_texts(queries)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.encoder.encode_images(list(images))

    def search_text_batch(self, queries: Sequence[str], k: int = 10, min_score: float | None = None,
                          target: str = "images") -> list[list[SearchResult]]:
        return self.search_vectors(self.encode_texts(queries), target, k, min_score)

    def search_image_batch(self, images: Sequence[ImageInput], k: int = 10, min_score: float | None = None,
                           target: str = "images") -> list[list[SearchResult]]:
        return self.search_vectors(self.encode_images(images), target, k, min_score)

    def search_text(self, query: str, k: int = 10, min_score: float | None = None) -> list[SearchResult]:
        """Text -> image."""
        return self.search_text_batch([query], k, min_score)[0]

    def search_image(self, image: ImageInput, k: int = 10, min_score: float | None = None) -> list[SearchResult]:
        """Image -> image."""
        return self.search_image_batch([image], k, min_score)[0]

    def search_texts_for_image(self, image: ImageInput, k: int = 10, min_score: float | None = None) -> list[SearchResult]:
        """Image -> text (the index's text side)."""
        return self.search_image_batch([image], k, min_score, target="texts")[0]

    def search_texts_for_text(self, query: str, k: int = 10, min_score: float | None = None) -> list[SearchResult]:
        """Text -> text."""
        return self.search_text_batch([query], k, min_score, target="texts")[0]

    def thumbnail_file(self, result: SearchResult) -> Path | None:
        """The display copy `otclip index` kept for this image result, if there is one."""
        if result.sha256 is None:
            return None
        path = self.directory.thumbnail_path(result.sha256)
        return path if path.exists() else None

    def indexed_image(self, item_id: int) -> str | None:
        """The path of the indexed image with this id, or None when no indexed image has it."""
        item = self._store.items([item_id]).get(item_id)
        return item["key"] if item is not None and item["side"] == "images" else None

    def lists_image(self, path: str) -> bool:
        """Whether the index lists this image path (the only images an app may open or serve)."""
        return self._store.has_key("images", str(path))

    def close(self) -> None:
        self._store.close()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
