"""The search API over an index directory: what the CLI and the app call; nothing else opens indexes."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import IndexDirectoryError
from .exclusions import Exclusions
from .faiss_indexes import best_k, exact_vectors, probe_search
from .filters import Filters
from .images import ImageInput
from .index_directory import IndexDirectory, LoadedSide
from .query_language import Term, combine, parse_query
from .search_results import SearchPage, SearchResult

if TYPE_CHECKING:
    from .encoding import Encoder
    from .model_loading import LoadedModel


ORDERS = ("score", "date")


def brute_force_limit(n: int) -> int:
    """Scoring p passing items costs ~p (an id from an SQLite index and a vector each); FAISS's best then
    filtered costs ~ the k n / p candidates it takes to find k that pass, each checked in SQLite: below 5%
    of the index (at least 2000 items, at most BRUTE_FORCE_MAX) scoring each is the cheaper (measured on
    2 cores, benchmarks/search_bench.py), and it is exact."""
    return min(BRUTE_FORCE_MAX, max(2_000, n // 20))
BRUTE_FORCE_MAX = 100_000  # a filter passing at most brute_force_limit(n) items scores all of them exactly
DATE_CANDIDATES = 1_000  # order="date": how many of the best-scoring items are sorted by date
COLLAPSE_FETCH = 4  # near-duplicate collapse: candidates fetched per result wanted
FIRST_ROUND = 4  # a filtered search checks at least this many of FAISS's best per result wanted
PROBE = 256  # candidates a filtered search's probe checks against the filter


class IndexSearcher:
    """Answers text/image queries against an index directory. The model is loaded once, on the first query
    that needs it (or by `load_model()`): `info` and, with `exported=True`, text and image queries answered
    by the index's exported towers (`text_query_model`, `image_query_model`) never load it, nor import torch."""

    def __init__(self, index_dir: str | Path, model: LoadedModel | None = None, device: str | None = None,
                 exported: bool = False, threads: int | None = None, few_queries: bool = False,
                 shared_from: IndexSearcher | None = None) -> None:
        """`few_queries`: this process answers a query or two and exits (the CLI): start fast over run fast.
        `shared_from`: a searcher of another index built with the same model, whose loaded model (and exported
        towers) this one uses: a server of several collections loads each distinct model once."""
        self.directory = IndexDirectory(index_dir)
        manifest = self.directory.manifest()
        if shared_from is not None:
            shared_from.prepare_queries()
            model = shared_from._model  # None when its exported towers answer every query
        if model is not None:
            self.directory.check_model(model.identity)
        self._model, self._device, self._threads = model, device, threads
        self._shared_from = shared_from  # loads the model for both, when a query first needs it
        self._encoder: Encoder | None = shared_from._encoder if shared_from is not None else None
        self._loading = threading.Lock()
        self._text_model = shared_from._text_model if shared_from is not None else None
        self._image_model = shared_from._image_model if shared_from is not None else None
        if exported and model is None:
            self._text_model, self._image_model = self._exported_towers(threads, few_queries)
        self.manifest = manifest
        self._sides = {side: self.directory.load_side(side, mmap=True) for side in manifest["sides"]}
        self._stamp = self._manifest_stamp()
        self._reload = threading.Lock()
        self._store = self.directory.reader()
        self._store_inode = _inode(self._store.path)

    def _exported_towers(self, threads: int | None, few_queries: bool) -> tuple:
        """(text, image) query models from the index's ONNX exports, None for a tower it does not keep."""
        text = image = None
        found = self.directory.query_model_files("text")
        if found is not None:
            from .text_query_model import TextQueryModel

            files, info = found
            text = TextQueryModel(files["text.onnx"], files["tokenizer.json"], info, threads=threads,
                                  few_queries=few_queries)
        found = self.directory.query_model_files("image")
        if found is not None:
            from .image_query_model import ImageQueryModel

            files, info = found
            image = ImageQueryModel(files["image.onnx"], info, threads=threads, few_queries=few_queries)
        return text, image

    @property
    def encoder(self) -> Encoder:
        """The torch encoder, loading the index's model on first use (checked against the index)."""
        if self._encoder is None:
            with self._loading:
                if self._encoder is None:
                    from .encoding import Encoder
                    from .model_loading import load_model
                    from .threads import apply_thread_budget, thread_budget

                    if self._shared_from is not None:
                        encoder = self._shared_from.encoder
                        self.directory.check_model(encoder.loaded.identity)
                        self._model, self._encoder = encoder.loaded, encoder
                        return encoder
                    apply_thread_budget(thread_budget(self._threads))
                    model = self._model or load_model(self.directory.model_spec(), device=self._device)
                    self.directory.check_model(model.identity)
                    self._model, self._encoder = model, Encoder(model)
        return self._encoder

    @property
    def model(self) -> LoadedModel:
        return self.encoder.loaded

    def load_model(self) -> None:
        """Load the model now, so that the first query that needs it is not the slow one."""
        self.encoder  # noqa: B018

    @property
    def image_draft(self) -> int | None:
        """The smallest side the image tower needs. An uploaded query decoded at the reduced JPEG scale that
        still covers it is decoded as indexed photos and terminal queries are: the same vector for the same
        file, and several times faster for a large photo than a full decode."""
        return self._image_model.spec["draft"] if self._image_model is not None else self.model.image_size

    def prepare_queries(self) -> None:
        """Make the first query fast (a server calls this at start): nothing to do when exported towers answer
        texts and images alike (no torch, no model in memory), else load the model."""
        if self._text_model is None or self._image_model is None:
            self.load_model()

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
                        sides = {side: self.directory.load_side(side, mmap=True) for side in manifest["sides"]}
                    except IndexDirectoryError:  # every failure to read the index directory is one of these
                        return self._sides
                    if _inode(self.directory.store_path) != self._store_inode:
                        self._store = self.directory.reader()  # requests in flight keep the old connection
                        self._store_inode = _inode(self._store.path)
                    self.manifest, self._sides, self._stamp = manifest, sides, stamp
        return self._sides

    def generation(self) -> tuple[int, int] | None:
        """The published generation this searcher answers from (loaded first if a newer one was published): what
        is computed from the index's contents, such as the app's example queries, is computed again when it
        changes."""
        self.current_sides()
        return self._stamp

    def recall(self, side: str = "images", sample: int = 200, k: int = 10) -> float:
        """The side's measured recall@k against exact search (`measured_recall`)."""
        return measured_recall(self._side(side), sample, k)

    def has_side(self, side: str) -> bool:
        return self.current_sides().get(side) is not None

    def info(self) -> dict:
        current = self.current_sides()
        sides = {
            side: {**self.manifest["sides"][side],  # index_type as published (no GPU copy made to name it)
                   "items": self._store.count(side),  # reads the store: a damaged one says so here
                   "retired": self._store.retired_count(side),
                   "index_bytes": self.directory.index_bytes(side),
                   "exact": loaded.exact, "reranked": not loaded.exact and loaded.vectors is not None}
            for side, loaded in current.items()
            if loaded is not None
        }
        return {
            "index_dir": str(self.directory.root),
            "model": self.manifest["model"],
            "dim": self.manifest["dim"],
            "metric": self.manifest["metric"],
            "sides": sides,
            "max_index_memory": self.manifest.get("max_index_memory"),
            "exclusions": self.manifest.get("exclusions", Exclusions().entry()),
            "source": self.manifest.get("source"),  # the folder or manifest the images mirror
            "size_bytes": self.directory.size_on_disk(),
        }

    # --- pages: filters, order, near-duplicates ---------------------------------------------------
    def search(self, query: str | Sequence[Term] | np.ndarray, target: str = "images", k: int = 10, offset: int = 0,
               min_score: float | None = None, filters: Filters | None = None, order: str = "score",
               collapse: float | None = None) -> SearchPage:
        """One page of the best `target` items for `query`: a query string (`query_language`: texts and images,
        weights, exclusions), its parsed terms, or a (d,) vector.

        `filters`: only items that pass are ranked, and the page holds the true top among them: FAISS's best
        are checked (as exact as the index); when too few of them pass and at most `brute_force_limit(n)`
        items pass in all, each of those is scored exactly; a wider filter fetches more of FAISS's best.
        `order="date"`: the DATE_CANDIDATES best (above `min_score`) sorted newest first.
        `collapse`: a result whose cosine to a better one is at least this is left out (near-duplicates; exact
        duplicates are always one result)."""
        if k < 1 or offset < 0:
            raise ValueError(f"k={k}, offset={offset}: k must be at least 1 and offset at least 0")
        if order not in ORDERS:
            raise ValueError(f"order {order!r}: expected one of {', '.join(ORDERS)}")
        if collapse is not None and not 0 < collapse <= 1:
            raise ValueError(f"collapse {collapse}: a cosine threshold in (0, 1]")
        if min_score is not None and math.isnan(min_score):
            raise ValueError(f"min score {min_score}: expected a cosine (results score from -1 to 1)")
        vector = query if isinstance(query, np.ndarray) else self.query_vector(query)
        want = offset + k + 1  # one more than the page: whether a next page exists
        fetch = max(want, DATE_CANDIDATES) if order == "date" else want
        ranked = self._ranked(vector, target, fetch * (COLLAPSE_FETCH if collapse else 1), filters, min_score)
        if collapse:
            ranked = self._collapse(ranked, collapse)[:fetch]
        meta = self._store.items([i for _, i in ranked])
        ranked = [(score, i) for score, i in ranked if i in meta]  # rows removed since this snapshot
        if order == "date":
            ranked.sort(key=lambda found: -(meta[found[1]]["taken"] or float("-inf")))
        page = ranked[offset : offset + k]
        results = [self._result(offset + j + 1, score, meta[i], target) for j, (score, i) in enumerate(page)]
        return SearchPage(results, offset, len(ranked) > offset + k)

    def query_vector(self, query: str | Sequence[Term]) -> np.ndarray:
        """The (d,) vector of a query string or its terms (the normalised weighted sum, `query_language`)."""
        terms = parse_query(query) if isinstance(query, str) else list(query)
        return combine(terms, self.encode_texts, self.encode_images)

    def _ranked(self, vector: np.ndarray, side: str, want: int, filters: Filters | None,
                min_score: float | None) -> list[tuple[float, int]]:
        """(score, item id) of the best `want` contents, best first; with filters, the item shown is the first
        one holding the content that passes (`_filtered`)."""
        loaded = self._side(side)
        query = np.ascontiguousarray(np.asarray(vector, np.float32).reshape(1, -1))
        if filters is None or filters.is_empty():
            found = self._faiss(loaded, query, want)
        else:
            found = self._filtered(loaded, side, query, want, filters)
        return [(score, i) for score, i in found if min_score is None or score >= min_score][:want]

    def _filtered(self, loaded: LoadedSide, side: str, query: np.ndarray, want: int,
                  filters: Filters) -> list[tuple[float, int]]:
        """The best `want` contents among items that pass. A probe (`probe_search`: PROBE candidates from a few
        IVF lists, about a tenth of a search) estimates the share s of items near the query that pass. When
        s n <= brute_force_limit(n), every passing item is scored exactly (their ids from SQLite, their vectors
        by position); otherwise FAISS's best 2 want / s are checked against the filter, 4x more each round
        until `want` pass (as exact as the index). A probe that guessed narrow for a filter passing more than
        the limit costs one bounded read of ids, then the rounds."""
        index, ids = loaded.index, loaded.ids
        n = index.ntotal
        limit = brute_force_limit(n)
        nearby = [int(ids[p]) for p in probe_search(index, query, PROBE)[1][0] if p >= 0]
        share = self._store.count_among(nearby, filters) / max(1, len(nearby))
        if share * n <= limit:
            passing = self._store.passing_ids(side, filters, limit)
            if passing is not None:
                return self._scored(loaded, passing, query[0], want)
        fetch = min(n, max(want * FIRST_ROUND, int(2 * want / max(share, 1 / PROBE))))
        while True:
            candidates = self._faiss(loaded, query, fetch)
            shown = self._store.passing_among(side, [i for _, i in candidates], filters)
            found = [(score, shown[i]) for score, i in candidates if i in shown]
            if len(found) >= want or fetch >= n:
                return found
            fetch = min(n, fetch * 4)

    def _scored(self, loaded: LoadedSide, passing: np.ndarray, query: np.ndarray, want: int) -> list[tuple[float, int]]:
        """Score every content an item of `passing` holds, exactly: (score, the first passing item holding it) of
        the best `want`. The vectors come from the side's position-ordered vectors file (memory-mapped), else
        from the index's own exact copies, else (an older index of codes) from the embedding chunks."""
        ids = loaded.ids
        passing = np.sort(passing)
        at = np.minimum(np.searchsorted(ids, passing), max(len(ids) - 1, 0))
        direct = ids[at] == passing if len(ids) else np.zeros(len(passing), bool)
        positions, shown = at[direct], passing[direct]  # FAISS position -> the item shown for it
        others = passing[~direct]  # items whose content another (lower) id stands for in FAISS
        found = self._store.representatives(others.tolist()) if len(others) and len(ids) else {}
        if found:
            items, representatives = np.array(list(found), np.int64), np.array(list(found.values()), np.int64)
            at = np.minimum(np.searchsorted(ids, representatives), len(ids) - 1)
            held = ids[at] == representatives
            positions, shown = np.concatenate([positions, at[held]]), np.concatenate([shown, items[held]])
            order = np.lexsort((shown, positions))  # per position, its first passing item
            first = np.unique(positions[order], return_index=True)[1]
            positions, shown = positions[order][first], shown[order][first]
        if loaded.vectors is not None:
            vectors = loaded.vectors[positions]
        else:
            vectors = exact_vectors(loaded.index, positions)
            if vectors is None:
                where = self._store.locations(shown.tolist())
                vectors = self.directory.vectors_at([where[i] for i in shown.tolist()])
        scores, best = best_k(vectors @ query, np.arange(len(positions)), want)
        return [(float(score), int(shown[j])) for score, j in zip(scores, best)]

    def _faiss(self, loaded: LoadedSide, query: np.ndarray, want: int) -> list[tuple[float, int]]:
        """(score, item id) of the index's best `want` for a (1, d) query."""
        scores, positions = nearest(loaded, query, want)
        return [(float(s), int(loaded.ids[p])) for s, p in zip(scores[0], positions[0]) if p >= 0]

    def _collapse(self, ranked: list[tuple[float, int]], threshold: float) -> list[tuple[float, int]]:
        """Greedy: keep a result unless its cosine to a result kept before it reaches `threshold`."""
        where = self._store.locations([i for _, i in ranked])
        ranked = [(score, i) for score, i in ranked if i in where]
        vectors = self.directory.vectors_at([where[i] for _, i in ranked])
        kept: list[int] = []
        for j in range(len(ranked)):
            if not kept or float(np.max(vectors[kept] @ vectors[j])) < threshold:
                kept.append(j)
        return [ranked[j] for j in kept]

    def count(self, filters: Filters | None = None, side: str = "images") -> int:
        """How many items of `side` pass the filters."""
        return self._store.count_passing(side, filters or Filters(), 2**62)

    def _side(self, side: str) -> LoadedSide:
        loaded = self.current_sides().get(side)
        if loaded is None:
            hint = "otclip index-texts TEXTS --out DIR" if side == "texts" else "otclip index IMAGES --out DIR"
            raise IndexDirectoryError(f"{self.directory.root}: has no {side} side; build it with `{hint}`")
        return loaded

    # --- vectors -----------------------------------------------------------------------------
    def search_vectors(
        self, queries: np.ndarray, side: str = "images", k: int = 10, min_score: float | None = None
    ) -> list[list[SearchResult]]:
        """Nearest items of `side` for each (d,) query vector (rows of `queries`)."""
        loaded = self._side(side)
        ids = loaded.ids
        if k < 1:
            raise ValueError(f"k={k}: must be at least 1")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, positions = nearest(loaded, queries, k)
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
            duplicates=item["duplicates"], extra=item["extra"], taken=item["taken"] if side == "images" else None,
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
        """(n, d) query vectors, through the exported image tower when this searcher uses it."""
        return (self._image_model or self.encoder).encode_images(list(images))

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

    def thumbnail_file(self, sha256: str | None) -> Path | None:
        """The display copy `otclip index` kept for this image content (a result's or an item's sha256), if any."""
        if sha256 is None:
            return None
        path = self.directory.thumbnail_path(sha256)
        return path if path.exists() else None

    def item(self, item_id: int) -> dict | None:
        """An item's metadata (path or text, sha256, size, width, height, label, extra, taken, duplicates)."""
        return self._store.items([item_id]).get(item_id)

    def indexed_image(self, item_id: int) -> str | None:
        """The path of the indexed image with this id, or None when no indexed image has it."""
        item = self._store.items([item_id]).get(item_id)
        return item["key"] if item is not None and item["side"] == "images" else None

    def lists_image(self, path: str) -> bool:
        """Whether the index lists this image path (the only images an app may open or serve)."""
        return self._store.has_key("images", str(path))

    def image_vectors(self, paths: Sequence[str]) -> np.ndarray:
        """(n, d) the stored embeddings of these indexed images (what the index searches), not encoded again."""
        where = self._store.key_locations("images", [str(p) for p in paths])
        unlisted = [p for p in paths if str(p) not in where]
        if unlisted:
            raise IndexDirectoryError(f"{self.directory.root}: {len(unlisted)} of the images are not in the index "
                                      f"(first: {unlisted[0]})")
        return self.directory.vectors_at([where[str(p)] for p in paths])

    def close(self) -> None:
        self._store.close()


def nearest(loaded: LoadedSide, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's (scores, positions) of the best k for each row of `queries` (-1: none). An index of lossy codes
    (SQ, PQ) is asked for `loaded.rerank` x k candidates, re-scored exactly from the side's memory-mapped
    vectors (FAISS's IndexRefine, with the float copy on disk instead of in RAM)."""
    index = loaded.index
    k = min(k, max(1, index.ntotal))
    if loaded.exact or loaded.vectors is None:
        return index.search(queries, k)
    scores, positions = index.search(queries, min(k * loaded.rerank, index.ntotal))
    out_scores, out_positions = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1)
    for row, (query, candidates) in enumerate(zip(queries, positions)):
        candidates = np.sort(candidates[candidates >= 0])
        best_scores, best = best_k(loaded.vectors[candidates] @ query, candidates, k)
        out_scores[row, : len(best)], out_positions[row, : len(best)] = best_scores, best
    return out_scores, out_positions


def measured_recall(loaded: LoadedSide, sample: int = 200, k: int = 10, seed: int = 0) -> float:
    """recall@k of the side's search (`nearest`, re-ranking included) against exact search, with `sample` stored
    vectors as the queries, each held out of both lists (its own position is dropped: an IVF search always
    finds the query itself, which would lift the figure by up to 1/k). Exact: a float32 brute force over the
    vectors file in blocks of 100 000 (RAM stays bounded)."""
    vectors = loaded.vectors
    n = len(loaded.ids)
    if vectors is None or n < 2:
        raise ValueError("recall needs the side's vectors file and at least 2 vectors (`otclip reindex` writes it)")
    k = min(k, n - 1)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    queries = np.ascontiguousarray(vectors[chosen])
    found = nearest(loaded, queries, k + 1)[1]
    exact_scores = np.full((len(chosen), k + 1), -np.inf, np.float32)
    exact = np.full((len(chosen), k + 1), -1, np.int64)
    for start in range(0, n, 100_000):
        block = np.asarray(vectors[start : start + 100_000]) @ queries.T  # (rows, queries)
        top = np.argpartition(-block, k, axis=0)[: k + 1] if len(block) > k + 1 else \
            np.repeat(np.arange(len(block))[:, None], len(chosen), axis=1)
        scores = np.concatenate([exact_scores, np.take_along_axis(block, top, axis=0).T], axis=1)
        positions = np.concatenate([exact, (top + start).T], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : k + 1]
        exact_scores, exact = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)

    def others(row: np.ndarray, query: int) -> set[int]:
        return set([p for p in row.tolist() if p not in (query, -1)][:k])

    hits = [len(others(a, q) & others(b, q)) for q, a, b in zip(chosen.tolist(), found, exact)]
    return float(np.mean(hits)) / k


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
