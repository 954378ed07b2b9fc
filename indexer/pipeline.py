"""Incremental, crash-safe indexing of an image collection or a text corpus into an index directory.

reader (collection.py) -> planner (what is new, changed, duplicated, removed) -> mapper (the torch
Encoder decoding in workers, or the model's checked ONNX image tower decoding in threads) -> writer
(embedding chunks, committed to SQLite as they complete) -> FAISS build. Under torchrun, every rank
plans identically, embeds its share of the new content and writes its own chunks; rank 0 ingests them
all and builds the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from otclip.engine.accelerators import gpu_may_be_present
from otclip.engine.atomic_files import write_lines_atomically
from otclip.engine.checksums import sha256_file
from otclip.engine.distributed import Ranks, init_from_env
from otclip.engine.errors import IndexDirectoryError
from otclip.engine.exclusions import Exclusions
from otclip.engine.faiss_indexes import auto_factory, new_index
from otclip.engine.flag_values import check_at_least
from otclip.engine.image_batches import ImageBatch
from otclip.engine.image_paths import URL_REASON, is_url, not_a_file, shown_path, undecodable_name
from otclip.engine.index_directory import IndexDirectory, model_of
from otclip.engine.metadata_store import ItemRecord
from otclip.engine.model_identity import identity_without_loading
from otclip.engine.model_memo import normal_spec, remembered_model
from otclip.engine.query_model_cache import cache_query_model, cached_query_model

if TYPE_CHECKING:
    from otclip.engine import LoadedModel

from .collection import CollectionItem, read_collection, read_texts


@dataclass
class IndexingSummary:
    side: str
    embedded: int = 0
    unchanged: int = 0
    duplicates: int = 0
    returned: int = 0  # files whose content an earlier run removed and kept (`IndexDirectory.remove_items`): not embedded
    removed: int = 0
    skipped: int = 0
    total: int = 0
    seconds: float = 0.0
    factory: str = ""
    errors_file: str | None = None
    model_loaded: bool = False
    torch_queries: dict[str, str] = field(default_factory=dict)  # tower -> why its queries need torch (not exported)
    repaired: int = 0  # items of damaged embedding chunks, embedded again

    def line(self) -> str:
        returned = f", {self.returned} came back" if self.returned else ""  # embeddings kept (`retired`)
        s = (f"{self.side}: {self.total} indexed ({self.embedded} embedded, {self.unchanged} unchanged, "
             f"{self.duplicates} duplicates{returned}), {self.removed} removed, {self.skipped} skipped")
        if self.skipped and self.errors_file:
            s += f" (reasons in {self.errors_file})"
        if self.repaired:
            s += f", {self.repaired} from damaged embedding chunks embedded again"
        for tower, reason in self.torch_queries.items():
            s += f", {tower} queries load torch ({reason})"
        return s + f", index {self.factory}, {self.seconds:.1f}s"


class _ModelOnDemand:
    """The run's model, loaded only when something must be embedded or exported: a re-index of unchanged
    files checks the model's identity against the index without building it (`identity_without_loading`)."""

    def __init__(self, model: str | LoadedModel | None, directory: IndexDirectory, ranks: Ranks) -> None:
        """`model` None: `model_of`."""
        if model is None:
            model = model_of(directory)
        # the manifest records a spec that reloads these weights from any folder (a model built in memory has
        # only its name)
        self.spec = normal_spec(model) if isinstance(model, str) else (model.spec or model.identity.name)
        self._model = None if isinstance(model, str) else model
        self._given = self._model is not None  # the caller's loaded model: its own torch forward embeds
        self.directory, self.ranks = directory, ranks

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> LoadedModel:
        if self._model is None:
            from otclip.engine import load_model

            self._model = load_model(self.spec, device=self.ranks.device())
            if self.directory.exists():
                self.directory.check_model(self._model.identity)
        return self._model

    def open_index(self) -> None:
        """Create the index for this model, or check that the existing one was built with it: without loading
        the model when its identity is known (an existing index's, or remembered from an earlier load)."""
        if self.directory.exists() and self._model is None:
            identity = identity_without_loading(self.spec, self.directory.manifest()["model"])
            if identity is not None:
                self.directory.check_model(identity)
                return
        elif self._model is None and (remembered := remembered_model(self.spec)) is not None:
            self.directory.open_for_model(self.spec, *remembered)
            return
        loaded = self.get()
        self.directory.open_for_model(self.spec, loaded.identity, loaded.embed_dim)

    def keep_query_models(self, summary: IndexingSummary) -> None:
        """Export the text and image towers for torch-free queries, unless the index keeps current ones."""
        for tower in ("text", "image"):
            reason = self._keep_query_model(tower)
            if reason:
                summary.torch_queries[tower] = reason

    def _keep_query_model(self, tower: str) -> str | None:
        """The index's checked export of `tower`: kept, linked from the cache, or exported now; None, or why not."""
        checksum = self.directory.manifest()["model"]["checksum"]
        reason = self.directory.query_model_refused(tower)
        if reason is None and self.directory.query_model_files(tower) is None:
            cached = cached_query_model(tower, checksum)
            if cached is not None:  # exported for an earlier index of this model: no model load
                self.directory.publish_query_model(tower, *cached, link=True)
                return None
            reason = _export_query_model(tower, self.get(), self.directory)
            if reason:
                self.directory.refuse_query_model(tower, reason, checksum)
            else:
                cache_query_model(tower, checksum, *self.directory.query_model_files(tower))
        return reason

    def _may_use_exports(self, exports: bool) -> bool:
        """Whether towers' exports may embed: not with --no-query-export, nor where a caller's loaded model, a GPU
        or torchrun ranks call for torch."""
        return exports and not self._given and not self.ranks.distributed and not gpu_may_be_present()

    def _export_at_hand(self, tower: str, exports: bool) -> tuple[dict, dict] | None:
        """The model's checked ONNX export of `tower` (kept in the index or cached from an earlier index of the
        model), where exports may embed (`_may_use_exports`); else None."""
        if not self._may_use_exports(exports):
            return None
        return self.directory.query_model_files(tower) or cached_query_model(
            tower, self.directory.manifest()["model"]["checksum"])

    def image_batches(self, paths: list[str], batch_size: int, workers: int | None, progress: bool,
                      thumbnails: bool, exports: bool) -> Iterator[ImageBatch]:
        """Encode `paths` with the image tower's export when one is at hand: such a run never imports torch
        (400 photos with ViT-B-32, see the README). On the CPU, a model's first index exports it first, wherever it
        can be exported: ONNX Runtime ran EfficientNet-lite0 at ~120 images/s where torch's forward ran 22 (the
        export, done at the end of the run anyway, is then done before). Else the torch model embeds them."""
        found = self._export_at_hand("image", exports)
        if found is None and self._may_use_exports(exports) and self._keep_query_model("image") is None:
            found = self._export_at_hand("image", exports)
        if found is not None:
            from otclip.engine.image_query_model import ImageQueryModel

            files, info = found
            tower = ImageQueryModel(files["image.onnx"], info)
            return tower.iter_image_batches(paths, batch_size, workers, progress, thumbnails)
        from otclip.engine.encoding import Encoder

        encoder = Encoder(self.get(), batch_size=batch_size, num_workers=workers)
        return encoder.iter_image_batches(paths, progress=progress, thumbnails=thumbnails)

    def text_encoder(self, batch_size: int, exports: bool) -> Callable[[list[str], bool], np.ndarray]:
        """`encode(texts, progress)`: through the text tower's export when one is at hand (a caption corpus of
        a model seen before is indexed without torch), else the torch model."""
        if (found := self._export_at_hand("text", exports)) is not None:
            from otclip.engine.text_query_model import TextQueryModel

            files, info = found
            tower = TextQueryModel(files["text.onnx"], files["tokenizer.json"], info)
            return lambda texts, progress: tower.encode_texts(texts, batch_size, progress)
        from otclip.engine.encoding import Encoder

        encoder = Encoder(self.get(), batch_size=batch_size)
        return lambda texts, progress: encoder.encode_texts(texts, progress=progress)


def _export_query_model(tower: str, loaded: LoadedModel, directory: IndexDirectory) -> str | None:
    """Export and check one tower into the index (torch is imported only here); None, or why not."""
    if tower == "text":
        from otclip.engine.text_query_export import export_text_query_model

        return export_text_query_model(loaded, directory)
    from otclip.engine.image_query_export import export_image_query_model

    return export_image_query_model(loaded, directory)


@dataclass
class _Plan:
    """What one indexing run must do. `groups` maps a new content hash to the items holding it."""

    groups: dict[str, list[tuple[CollectionItem, int, int]]] = field(default_factory=dict)  # (item, size, mtime)
    reuse: list[ItemRecord] = field(default_factory=list)  # known content: record only, no embedding
    touched: list[tuple[str, int, int]] = field(default_factory=list)  # same content, new size/mtime
    unchanged: int = 0
    duplicates: int = 0  # new or changed files whose content is already embedded
    returned: int = 0  # new files whose content was removed before and is kept retired
    errors: list[dict] = field(default_factory=list)


def _stat(item: CollectionItem) -> tuple[int, int] | str:
    if is_url(item.path):
        return URL_REASON
    if reason := undecodable_name(item.path):
        return reason
    try:
        st = os.stat(item.path)
    except FileNotFoundError:
        return "dangling symlink or missing file" if os.path.islink(item.path) else "missing file"
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if reason := not_a_file(st.st_mode):
        return reason
    if not os.access(item.path, os.R_OK):
        return "unreadable (permission denied)"
    return st.st_size, st.st_mtime_ns


def _hash_all(paths: list[str]) -> dict[str, str | Exception]:
    def one(p):
        try:
            return sha256_file(p)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL: threads overlap I/O
        return dict(zip(paths, pool.map(one, paths)))


def _same_metadata(row, item: CollectionItem) -> bool:
    extra = json.loads(row["extra"]) if row["extra"] else {}
    return row["text"] == item.caption and row["label"] == item.label and extra == (item.extra or {})


def _plan(items: list[CollectionItem], directory: IndexDirectory, ranks: Ranks) -> _Plan:
    plan = _Plan()
    stored = directory.store.stats("images")
    known = directory.store.hash_locations("images")
    known_facts = {row["sha256"]: (row["width"], row["height"], row["exif_time"]) for row in stored.values()}
    retired = directory.store.retired("images")
    candidates: list[tuple[CollectionItem, int, int]] = []
    for item in items:
        stated = _stat(item)
        if isinstance(stated, str):
            plan.errors.append({"path": shown_path(item.path), "reason": stated})
            continue
        size, mtime = stated
        row = stored.get(item.path)
        if row is not None and row["size"] == size and row["mtime_ns"] == mtime:
            plan.unchanged += 1
            if not _same_metadata(row, item):
                plan.reuse.append(_record(item, row["sha256"], row["row"], size, mtime, row["shard"],
                                          (row["width"], row["height"], row["exif_time"])))
            continue
        candidates.append((item, size, mtime))
    # every rank hashes its share of the candidates; all ranks then see all hashes
    mine = [c[0].path for c in candidates[ranks.rank :: ranks.world_size]]
    hashes: dict[str, str | Exception] = {}
    for part in ranks.gather(_hash_all(mine)):
        hashes.update(part)
    for item, size, mtime in candidates:
        digest = hashes[item.path]
        if isinstance(digest, Exception):
            plan.errors.append({"path": item.path, "reason": f"unreadable ({digest})"})
            continue
        row = stored.get(item.path)
        if row is not None and row["sha256"] == digest and _same_metadata(row, item):
            plan.touched.append((item.path, size, mtime))
            plan.unchanged += 1
        elif digest in known:
            shard, r = known[digest]
            plan.duplicates += 1
            plan.reuse.append(_record(item, digest, r, size, mtime, shard, known_facts.get(digest, (None, None, None))))
        elif digest in retired:
            kept = retired[digest]
            plan.returned += 1
            plan.reuse.append(_record(item, digest, kept["row"], size, mtime, kept["shard"],
                                      (kept["width"], kept["height"], kept["exif_time"])))
        else:
            plan.groups.setdefault(digest, []).append((item, size, mtime))
    return plan


def _record(item: CollectionItem, digest: str, row: int, size, mtime, shard=None,
            facts=(None, None, None)) -> ItemRecord:
    """`facts`: what decoding the content found (width, height, EXIF time)."""
    return ItemRecord(key=item.path, sha256=digest, row=row, text=item.caption, label=item.label,
                      extra=item.extra or None, size=size, mtime_ns=mtime, width=facts[0], height=facts[1],
                      shard=shard, exif_time=facts[2])


class _ChunkWriter:
    """Buffers embeddings and records; each full chunk is written, and (single process) committed."""

    def __init__(self, directory: IndexDirectory, side: str, ranks: Ranks, size: int) -> None:
        self.directory, self.side, self.ranks, self.size = directory, side, ranks, size
        self.run = f"{side}-{time.time_ns()}-r{ranks.rank}"
        self.count = 0
        self.vectors: list[np.ndarray] = []
        self.records: list[ItemRecord] = []

    def add(self, vector: np.ndarray, records: list[ItemRecord]) -> None:
        row = len(self.vectors)
        for r in records:
            r.row = row
        self.vectors.append(vector)
        self.records.extend(records)
        if len(self.vectors) >= self.size:
            self.flush()

    def write_reused(self, records: list[ItemRecord]) -> None:
        """A chunk of records whose embeddings are already stored (each names its shard and row)."""
        self.flush()
        self.records = records
        self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        name = f"{self.run}-{self.count:06d}"
        dim = self.directory.manifest()["dim"]
        vectors = np.stack(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)
        self.directory.write_chunk(name, self.side, vectors, self.records)
        if not self.ranks.distributed:
            self.directory.ingest_chunk(name)  # committed: a crash after this loses nothing
        self.count += 1
        self.vectors, self.records = [], []


def index_images(
    source: str | Path,
    index_dir: str | Path,
    model: str | LoadedModel | None = None,
    factory: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int = 1024,
    progress: bool = True,
    query_models: bool = True,
    thumbnails: bool = True,
    max_index_memory: int | None = None,
    exclusions: Exclusions | None = None,
    replace: bool = False,
) -> IndexingSummary:
    """Index (or update the index of) an image folder or manifest. Returns the run's summary.
    `thumbnails`: keep a JPEG display copy of each new image content (the app's result tiles).
    `max_index_memory`: bytes the FAISS index may take (kept with the index for later runs; 0 removes it).
    `model`: a spec or a loaded model; None: the index's own model, else the default.
    `exclusions`: what below a folder is not part of the collection (`exclusions.Exclusions`), kept with the index
    for the runs after this one; None: those kept by the last run given some (a manifest: none apply).
    `replace`: index another source than the one the index mirrors in its place, though photos leave the index
    (else refused: `_refuse_to_switch`).

    The model is loaded only if there is something new to embed (or the text tower to export:
    `text_query_model`, kept for torch-free text queries); the FAISS index is rebuilt only if the
    indexed set changed or another factory is asked for."""
    start = time.time()
    for flag, value, low in (("--batch-size", batch_size, 1), ("--workers", workers, 0), ("--chunk-size", chunk_size, 1)):
        check_at_least(flag, value, low)
    if Path(source).is_dir() and Path(source).resolve() == Path(index_dir).resolve():
        # its thumbnails would be indexed as photos at the next run, and `watch` would take every change for its own
        raise ValueError(f"--out {index_dir}: the folder being indexed; give the index a folder of its own "
                         f"(e.g. --out {Path(source) / '.otclip'}: left out of the photos)")
    ranks = init_from_env()
    try:
        directory = IndexDirectory(index_dir)
        with directory.writing() if ranks.is_main else nullcontext():  # one writer at a time (the main rank)
            summary = _index_images(source, directory, _ModelOnDemand(model, directory, ranks), ranks, factory,
                                    batch_size, workers, chunk_size, progress, query_models, thumbnails,
                                    max_index_memory, exclusions, replace)
    finally:
        ranks.close()
    summary.seconds = time.time() - start
    return summary


def _index_images(source, directory: IndexDirectory, models: _ModelOnDemand, ranks: Ranks, factory: str,
                  batch_size: int, workers: int | None, chunk_size: int, progress: bool, query_models: bool,
                  thumbnails: bool, max_index_memory: int | None, exclusions: Exclusions | None,
                  replace: bool) -> IndexingSummary:
    ingested = repaired = 0
    if ranks.is_main:
        ingested, repaired = _prepare(directory, models, factory)
    ranks.barrier()
    if not ranks.is_main:
        models.open_index()  # checks the identity: every rank embeds with the index's model
    unreadable: list[dict] = []
    folder = Path(source).is_dir()
    given = exclusions is not None
    if exclusions is None:
        exclusions = directory.kept_exclusions() if folder else Exclusions()
    items = read_collection(source, unreadable, exclusions)
    here = Path(source).resolve()  # the source as the index keeps it
    if not replace:
        _refuse_to_switch(here, directory, items)
    plan = _plan(items, directory, ranks)
    _refuse_to_empty(source, directory, "images", len(items) - len(plan.errors), len(items), unreadable)
    plan.errors.extend(unreadable)  # reported with the files skipped
    summary = IndexingSummary("images", unchanged=plan.unchanged, repaired=repaired)
    writer = _ChunkWriter(directory, "images", ranks, chunk_size)
    if ranks.is_main:  # known content under a new path, or new metadata: no embedding needed
        writer.write_reused(plan.reuse)
        summary.duplicates, summary.returned = plan.duplicates, plan.returned
    groups = list(plan.groups.items())[ranks.rank :: ranks.world_size]
    summary.duplicates += sum(len(g) - 1 for _, g in groups)
    failed: list[dict] = []
    paths = [g[0][0].path for _, g in groups]
    batches = models.image_batches(paths, batch_size, workers, progress and ranks.is_main, thumbnails,
                                   query_models) if paths else []
    for batch in batches:
        for j, i in enumerate(batch.indices):
            digest, group = groups[i]
            facts = (*batch.sizes[j], batch.taken[j])
            if thumbnails:
                directory.write_thumbnail(digest, batch.thumbnails[j])
            writer.add(batch.embeddings[j], [_record(it, digest, 0, sz, mt, None, facts) for it, sz, mt in group])
        for i, reason in batch.failures:
            failed.extend({"path": it.path, "reason": reason} for it, _, _ in groups[i][1])
        summary.embedded += len(batch.indices)
    writer.flush()
    summary.duplicates = sum(ranks.gather(summary.duplicates))
    summary.embedded = sum(ranks.gather(summary.embedded))
    failed = [f for part in ranks.gather(failed) for f in part]
    ranks.barrier()
    changed = False
    if ranks.is_main:
        ingested += directory.ingest_pending()
        errors = plan.errors + failed
        present = {it.path for it in items} - {e["path"] for e in errors}
        gone = [k for k in directory.store.stats("images") if k not in present]
        directory.remove_items("images", gone, retire=True)
        if gone:
            directory.prune_thumbnails()
        directory.store.update_stats("images", plan.touched)
        directory.store.index_columns(sorted({column for item in items for column in item.extra or {}}))
        summary.removed = len([g for g in gone if g not in {e["path"] for e in errors}])
        summary.skipped = len(errors)
        errors_file = directory.root / "errors.jsonl"
        write_lines_atomically(errors_file, [json.dumps(e, ensure_ascii=False) for e in errors])
        summary.errors_file = str(errors_file)
        changed = bool(ingested or writer.count or gone or repaired)
    _publish(directory, "images", factory, changed, summary, models, query_models, progress,
             max_index_memory, ranks)
    if ranks.is_main and directory.exists():  # after a run that ended: the next one goes on from it
        directory.keep_source(str(here))
        if given and folder:
            directory.keep_exclusions(exclusions)
    summary.model_loaded = models.loaded
    ranks.barrier()
    return summary


def _prepare(directory: IndexDirectory, models: _ModelOnDemand, factory: str) -> tuple[int, int]:
    """Before anything is embedded: open (or check) the index for the model, check the factory string, commit
    what a killed run left, drop damaged chunks (their items are embedded again) and forget expired retired
    contents (after the commit: a killed run's thumbnails belong to contents not yet in the store; the chunks they
    leave unused go at the next `ingest_pending`). Returns (records ingested, items dropped)."""
    models.open_index()
    if factory != "auto":
        new_index(factory, directory.manifest()["dim"])  # a bad factory string fails now, not after embedding
    ingested = directory.ingest_pending()
    repaired = directory.drop_damaged_chunks()
    directory.expire_retired()
    return ingested, sum(len(keys) for keys in repaired.values())


def _publish(directory: IndexDirectory, side: str, factory: str, changed: bool, summary: IndexingSummary,
             models: _ModelOnDemand, query_models: bool, progress: bool, max_index_memory: int | None,
             ranks: Ranks | None = None) -> None:
    """Rebuild the side's FAISS index if its set changed (or another factory or memory budget is asked for): an
    unchanged one keeps its generation, so a running server does not reload it. Then keep the text-tower
    export. Under torchrun every rank calls it: rank 0 decides, and all ranks add a share of the rows."""
    ranks = ranks or Ranks()
    rebuild, current = False, None
    if ranks.is_main:
        manifest = directory.manifest()
        current = manifest["sides"].get(side)
        budget = manifest.get("max_index_memory") if max_index_memory is None else (max_index_memory or None)
        rebuild = (changed or current is None or factory not in ("auto", current["factory"])
                   or (factory == "auto" and current.get("max_index_memory") != budget))
    if ranks.gather(rebuild)[0]:
        current = directory.publish(side, factory, progress=progress, max_index_memory=max_index_memory, ranks=ranks)
    if not ranks.is_main:
        return
    summary.factory, summary.total = current["factory"], current["items"]
    if query_models:
        models.keep_query_models(summary)


def index_texts(
    source: str | Path,
    index_dir: str | Path,
    model: str | LoadedModel | None = None,
    factory: str = "auto",
    batch_size: int = 256,
    chunk_size: int = 4096,
    progress: bool = True,
    query_models: bool = True,
    max_index_memory: int | None = None,
) -> IndexingSummary:
    """Index a text corpus as the text side of an index directory (the set of texts in the file).
    Like `index_images`, the model is loaded only for new texts or the text-tower export."""
    start = time.time()
    check_at_least("--batch-size", batch_size)
    check_at_least("--chunk-size", chunk_size)
    directory = IndexDirectory(index_dir)
    with directory.writing():
        summary = _index_texts(source, directory, _ModelOnDemand(model, directory, Ranks()), factory, batch_size,
                               chunk_size, progress, query_models, max_index_memory)
    summary.seconds = time.time() - start
    return summary


class SourceSwitchError(IndexDirectoryError):
    """Another source than the one the index mirrors, which would take photos out (`_refuse_to_switch`)."""


def _refuse_to_switch(source: Path, directory: IndexDirectory, items: Sequence[CollectionItem]) -> None:
    """A run of another source than the one the index mirrors (`IndexDirectory.kept_source`) that would take photos
    out of the index: most often another folder given by mistake (a second folder replaces the first rather than
    joining it; a subfolder drops the rest), or a library moved elsewhere. Refused in one line, before any file is
    read, unless `replace` (photos that moved are then not embedded again: their contents are kept retired). The
    same source with other photos (another card in the reader) is the index following it, not refused."""
    kept = directory.kept_source()
    if kept is None or kept == str(source):
        return
    listed = {item.path for item in items}
    held = directory.store.stats("images")
    leaving = sum(key not in listed for key in held)
    if leaving and any(os.path.exists(path) for path in listed):  # else a drive not mounted: `_refuse_to_empty`
        raise SourceSwitchError(
            f"{source}: not the source {directory.root} mirrors ({kept}), and indexing it would take {leaving} of its "
            f"{len(held)} photos out. To index it in its place: otclip index {source} --out {directory.root} "
            "--replace (photos that moved are not embedded again); to search both, index a folder that holds both or "
            "a manifest that lists both, or serve two indexes")


class EmptySourceError(IndexDirectoryError):
    """A source with nothing in it, for an index that holds items of that side (`_refuse_to_empty`)."""


def _refuse_to_empty(source, directory: IndexDirectory, side: str, found: int, listed: int,
                     unreadable: Sequence[dict] = ()) -> None:
    """A source with nothing in it that can be read (`found` of `listed`) would remove every item of the side (the
    index mirrors its source): most often a drive not mounted (a folder left empty, a manifest whose files are all
    missing) or a wrong path, and the items would have to be embedded again. Refused in one line, which names the
    first folder that could not be listed, if any."""
    held = directory.store.count(side) if not found else 0
    if held:
        what = f"none of the {listed} {side} it lists can be read" if listed else f"no {side} in it"
        if unreadable:
            what += f" ({unreadable[0]['path']}: {unreadable[0]['reason'].split(':')[0]})"
        raise EmptySourceError(f"{source}: {what}, but the index holds {held}; nothing was removed (a drive not "
                               f"mounted, or another path?). To start over, delete {directory.root}")


def _index_texts(source, directory: IndexDirectory, models: _ModelOnDemand, factory: str, batch_size: int,
                 chunk_size: int, progress: bool, query_models: bool,
                 max_index_memory: int | None) -> IndexingSummary:
    ingested, repaired = _prepare(directory, models, factory)
    texts = read_texts(source)
    _refuse_to_empty(source, directory, "texts", len(texts), len(texts))
    stored = directory.store.stats("texts")
    wanted: dict[str, object] = {}
    for t in texts:
        wanted.setdefault(hashlib.sha256(t.text.encode()).hexdigest(), t)
    new = [(k, t) for k, t in wanted.items() if k not in stored]
    summary = IndexingSummary("texts", unchanged=len(wanted) - len(new), duplicates=len(texts) - len(wanted),
                              repaired=repaired)
    writer = _ChunkWriter(directory, "texts", Ranks(), chunk_size)
    if new:
        encode = models.text_encoder(batch_size, query_models)
        for startpos in range(0, len(new), chunk_size):
            part = new[startpos : startpos + chunk_size]
            vectors = encode([t.text for _, t in part], progress)
            for (key, t), v in zip(part, vectors):
                writer.add(v, [ItemRecord(key=key, sha256=key, row=0, text=t.text, label=t.label, extra=t.extra or None)])
        writer.flush()
    summary.embedded = len(new)
    gone = [k for k in stored if k not in wanted]
    directory.remove_items("texts", gone)
    summary.removed = len(gone)
    _publish(directory, "texts", factory, bool(ingested or writer.count or gone or repaired), summary, models,
             query_models, progress, max_index_memory)
    summary.model_loaded = models.loaded
    return summary


def reindex(index_dir: str | Path, factory: str = "auto", max_index_memory: int | None = None) -> list[dict]:
    """Rebuild every side's FAISS index with another factory string (or `auto` within another memory budget)
    from the stored embeddings. Under torchrun every rank adds a share of each side's rows and rank 0 merges
    them (`IndexDirectory.publish`); rank 0 returns the sides' entries, the other ranks an empty list."""
    ranks = init_from_env()
    try:
        directory = IndexDirectory(index_dir)
        if ranks.is_main:
            directory.manifest()  # not an index: said before the writer lock would create the folder
        with directory.writing() if ranks.is_main else nullcontext():
            sides = ranks.gather(_sides_to_rebuild(directory, factory, max_index_memory) if ranks.is_main else None)[0]
            rebuilt = [directory.publish(side, factory, progress=ranks.is_main, max_index_memory=max_index_memory,
                                         ranks=ranks) for side in sides]
        return [side for side in rebuilt if side is not None]
    finally:
        ranks.close()


def _sides_to_rebuild(directory: IndexDirectory, factory: str, max_index_memory: int | None) -> list[str]:
    """The published sides, once the factory string, the budget and the stored embeddings were checked (under
    the writer lock): a bad factory, a budget no side fits or a damaged chunk is refused before anything is
    rebuilt."""
    manifest = directory.manifest()
    if factory != "auto":
        new_index(factory, manifest["dim"])
    elif max_index_memory:
        for side in manifest["sides"].values():
            auto_factory(side["vectors"], manifest["dim"], max_index_memory)
    directory.ingest_pending()
    damaged = directory.damaged_chunks()
    if damaged:
        shard, reason = next(iter(damaged.items()))
        raise IndexDirectoryError(
            f"{directory.embeddings_dir / shard}.npy: {reason} ({len(damaged)} damaged chunk(s)); nothing was "
            f"changed. Run `otclip index SOURCE --out {directory.root}` (and `index-texts` for texts): it embeds "
            "their items again")
    return list(directory.manifest()["sides"])
