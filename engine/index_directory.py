"""The on-disk layout of an otclip index and the only code that reads or writes it.

  INDEX_DIR/manifest.json        format version, model identity, dimension, metric, per side:
                                 factory, counts, generation, updated; replaced atomically (the commit point)
  INDEX_DIR/metadata.sqlite      MetadataStore (one row per image / text)
  INDEX_DIR/embeddings/*.npy     embedding chunks (plain float32 arrays; `reindex` rebuilds from them)
  INDEX_DIR/embeddings/*.json    a chunk's records (and model) until it is ingested into SQLite, then
  INDEX_DIR/embeddings/records/  ... kept here (records_log) while a rebuild of metadata.sqlite needs it
  INDEX_DIR/{side}-{gen}.faiss   the FAISS index of a side, CPU form
  INDEX_DIR/{side}-{gen}.ids.npy FAISS position -> SQLite id
  INDEX_DIR/{side}-{gen}.vectors.npy  the side's vectors in FAISS position order, memory-mapped: exact scores
                                 for filtered search whatever the index keeps (IVF lists, PQ codes)
  INDEX_DIR/{side}-{gen}.ivfdata the inverted lists of an index that torchrun ranks built as shards, merged on
                                 disk (FAISS OnDiskInvertedLists; the .faiss names it and reads it memory-mapped)
  INDEX_DIR/errors.jsonl         files skipped by the last run, with reasons
  INDEX_DIR/thumbnails/ab/{sha256}.jpg  a display copy of each distinct image content (app result tiles)
  INDEX_DIR/query/text.onnx      the model's text tower for torch-free text queries (text_query_model),
  INDEX_DIR/query/text.onnx.data ... its weights,
  INDEX_DIR/query/tokenizer.json ... its tokenizer, and
  INDEX_DIR/query/text.json      ... what it was checked against (written last: the export's commit point)
  INDEX_DIR/query/image.onnx     the image tower for torch-free image queries (image_query_model), its
  INDEX_DIR/query/image.onnx.data  weights, and image.json (its preprocessing; written last)
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
from tqdm import tqdm

from .atomic_files import (
    publish_file_set,
    read_file_set,
    sync_file,
    write_atomically,
    write_bytes_atomically,
    write_json_atomically,
    write_npy_atomically,
)
from .distributed import Ranks
from .errors import IndexDirectoryError, NewerIndexFormatError
from .exclusions import Exclusions
from .faiss_indexes import (
    ADD_BLOCK,
    add_rows,
    index_description,
    list_entry_bytes,
    load_index,
    merge_shard_files,
    mergeable,
    new_index,
    on_disk_lists,
    rerank_factor,
    save_index,
    train_index,
)
from .metadata_store import SCHEMA_VERSION, SIDES, ItemRecord, MetadataStore
from .model_identity import DEFAULT_MODEL_NAME, ModelIdentity
from .model_memo import normal_spec
from .records_log import RecordsLog, chunk_payload, in_order, read_entry

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METRIC = "inner_product"


SIDE_FILES = (".faiss", ".ids.npy", ".vectors.npy", ".ivfdata")  # what `publish` writes for a side, per generation
TRAINED_SUFFIX = ".trained.faiss"  # a sharded build's trained empty index, beside its ranks' `.shard-R.faiss`
PART_BYTES = 1 << 30  # one process adds an IVF index's rows in parts of at most this many bytes of lists
RETIRED_DAYS = 30  # how long the embedding and thumbnail of a removed image's content are kept for its return


def _manifest_problem(data: object) -> str | None:
    """What in a parsed manifest.json the readers could not use (None: nothing): every field they index is checked
    here, so a damaged one is one line naming the file, which `repair` then writes again."""
    if not isinstance(data, dict) or not {"model", "dim", "sides"} <= set(data):
        return "not an otclip manifest (no model, dim and sides)"
    model, sides = data["model"], data["sides"]
    if not (isinstance(model, dict) and all(isinstance(model.get(key), str) for key in ("spec", "name", "checksum"))):
        return "its model entry is damaged (no spec, name and checksum)"
    numbers = {key: data[key] for key in ("dim", "format_version", "max_index_memory") if key in data}
    for key, value in numbers.items():
        if type(value) is not int or (value < 1 and key != "format_version"):
            return f"its {key} is damaged (not a positive integer)"
    if not isinstance(sides, dict):
        return "its sides entry is damaged (not a mapping)"
    kept = data.get("exclusions", Exclusions().entry())
    if not (isinstance(kept, dict) and isinstance(kept.get("patterns"), list)
            and all(isinstance(p, str) for p in kept["patterns"]) and type(kept.get("include_hidden")) is bool):
        return "its exclusions entry is damaged (no list of patterns and include_hidden)"
    if not isinstance(data.get("source", ""), str):
        return "its source entry is damaged (not a path)"
    for side, entry in sides.items():
        if not (side in SIDES and isinstance(entry, dict) and type(entry.get("generation")) is int
                and isinstance(entry.get("factory"), str)):
            return f"side entry {side!r} damaged (not {' or '.join(SIDES)} with a generation and a factory)"
    return None


def model_of(directory: IndexDirectory) -> str:
    """The spec of the index's own model, else the default's: a command that updates or evaluates an index need
    not name its model."""
    return directory.model_spec() if directory.exists() else DEFAULT_MODEL_NAME


class LoadedSide(NamedTuple):
    index: faiss.Index
    ids: np.ndarray  # FAISS position -> SQLite item id
    vectors: np.ndarray | None  # (n, d) float32, memory-mapped, in position order; None for an older index
    rerank: int  # candidates per result re-scored from `vectors` (`rerank_factor`; 1: the index is exact)

    @property
    def exact(self) -> bool:
        return self.rerank == 1


class IndexDirectory:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.embeddings_dir = self.root / "embeddings"
        self._store: MetadataStore | None = None

    # --- one writer at a time ----------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the directory's writer lock (flock on INDEX_DIR/.writer.lock, released by the kernel if the
        holder dies): a second `index`/`index-texts`/`reindex` waits, saying which process holds it. Once
        held, the temporary files of killed runs are removed (no other writer can own them)."""
        if self.root.exists() and not self.root.is_dir():
            raise IndexDirectoryError(f"{self.root}: is a file, not an index directory")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".writer.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                print(f"otclip: {self.root} is being written by {holder}; waiting for it to finish", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            lock.truncate(0)
            lock.write(f"pid {os.getpid()} (since {time.strftime('%H:%M:%S')})")
            lock.flush()
            try:
                self._remove_leftovers()
                yield
            finally:
                lock.truncate(0)
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_leftovers(self) -> None:
        for folder in (self.root, self.embeddings_dir, self.records_dir, self.query_dir):
            for leftover in folder.glob(".*.tmp*"):
                leftover.unlink(missing_ok=True)
        for leftover in self.thumbnails_dir.glob("*/.*.tmp*"):
            leftover.unlink(missing_ok=True)
        for pattern in (f"*-*{TRAINED_SUFFIX}", "*-*.shard-*.faiss"):  # a sharded build that was killed
            for leftover in self.root.glob(pattern):
                leftover.unlink(missing_ok=True)
        self._remove_unpublished_generations()

    def _remove_unpublished_generations(self) -> None:
        """The files of a side's generations newer than the published one: a build killed before its commit (up to
        the whole index, its vectors and its lists on disk). No manifest ever named them, so no reader holds them,
        and the next build may take the number again. Where the manifest names no generation of a side (a first
        build, or a rebuilt manifest: a server may still hold older files), they stay until the next `publish`."""
        try:
            sides = self.manifest()["sides"]
        except IndexDirectoryError:  # `repair` holds the lock too: a damaged manifest must not stop it
            return
        for side, entry in sides.items():
            for number, path in self._generation_paths(side, SIDE_FILES):
                if number > entry["generation"]:
                    path.unlink(missing_ok=True)

    # --- manifest ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.exists():
            if any(self.embeddings_dir.glob("*.npy")):
                raise IndexDirectoryError(f"{self.manifest_path}: missing, though the index holds embeddings; run "
                                          f"`otclip repair {self.root}`")
            raise IndexDirectoryError(f"{self.root}: not an otclip index (no {MANIFEST}); build one with `otclip index`")
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise IndexDirectoryError(f"{self.manifest_path}: unreadable ({type(exc).__name__}: {exc}); run "
                                      f"`otclip repair {self.root}`") from None
        version = data.get("format_version", 0) if isinstance(data, dict) else 0
        if type(version) is int and version > FORMAT_VERSION:  # a newer layout: not judged by this one's rules
            raise NewerIndexFormatError(f"{self.root}: index format {version} is newer than this otclip (nothing was "
                                        "changed; use a newer otclip)")
        problem = _manifest_problem(data)
        if problem:
            raise IndexDirectoryError(f"{self.manifest_path}: {problem}; run `otclip repair {self.root}`")
        return data

    def model_identity(self) -> ModelIdentity:
        m = self.manifest()["model"]
        return ModelIdentity(m["name"], m["checksum"])

    def model_spec(self) -> str:
        """The spec that loads the index's model, from any folder (`normal_spec`)."""
        return normal_spec(self.manifest()["model"]["spec"], base=self.root.resolve().parent)

    def open_for_model(self, spec: str, identity: ModelIdentity, dim: int) -> None:
        """Create the directory for this model, or check that an existing one was built with it."""
        if self.exists():
            self.check_model(identity)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.embeddings_dir.mkdir(exist_ok=True)
        write_json_atomically(
            self.manifest_path,
            {
                "format_version": FORMAT_VERSION,
                "model": {"spec": spec, "name": identity.name, "checksum": identity.checksum},
                "dim": dim,
                "metric": METRIC,
                "created": time.time(),
                "sides": {},
            },
        )

    def kept_source(self) -> str | None:
        """The absolute path of the folder or manifest the last image run indexed (`keep_source`); None before."""
        return self.manifest().get("source") if self.exists() else None

    def keep_source(self, source: str) -> None:
        """Remember the source an image run indexed, in manifest.json: a later run of another source is checked
        (the index mirrors one source)."""
        self._keep("source", source)

    def kept_exclusions(self) -> Exclusions:
        """What runs over a folder leave out, as the last run that was given exclusions kept them
        (`keep_exclusions`); the defaults for an index with none kept, or none yet."""
        kept = self.manifest().get("exclusions") if self.exists() else None
        return Exclusions() if kept is None else Exclusions.from_entry(kept)

    def keep_exclusions(self, exclusions: Exclusions) -> None:
        """Keep a folder run's exclusions for the runs after it, which are not given them again (the defaults
        keep nothing). Kept in manifest.json, as the memory budget is."""
        self._keep("exclusions", exclusions.entry() if exclusions != Exclusions() else None)

    def _keep(self, key: str, value: object) -> None:
        """Keep a run's setting in manifest.json for the runs after it (None: none kept), written only when it
        changed: a write is a new manifest, which every reader of the index reloads."""
        manifest = self.manifest()
        if manifest.get(key) == value:
            return
        manifest.pop(key, None)
        if value is not None:
            manifest[key] = value
        write_json_atomically(self.manifest_path, manifest)

    def check_model(self, identity: ModelIdentity) -> None:
        built = self.model_identity()
        if not built.same_weights(identity):
            raise IndexDirectoryError(
                f"{self.root}: built with model {built}, refusing model {identity}; "
                f"use --model {self.model_spec()} or build a new index"
            )

    # --- metadata and embeddings ---------------------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.root / "metadata.sqlite"

    @property
    def store(self) -> MetadataStore:
        """The metadata store, created with a new index. An index that already holds data never gets a
        fresh, empty store: its chunks would then look unreferenced and be deleted (`ingest_pending`)."""
        if self._store is None:
            if not self.store_path.exists() and self._holds_data():
                raise IndexDirectoryError(
                    f"{self.store_path}: missing, though the index holds embeddings; nothing was changed. Run "
                    f"`otclip repair {self.root}`: it rebuilds the store from the embedding chunks' records")
            self.embeddings_dir.mkdir(parents=True, exist_ok=True)
            self._store = MetadataStore(self.store_path)
        return self._store

    def reader(self) -> MetadataStore:
        """A read-only connection to the metadata store (a searcher's). A store written by an older otclip is
        migrated first (new columns and indexes, in SQLite transactions), when the directory is writable."""
        if not self.store_path.exists():
            raise IndexDirectoryError(f"{self.store_path}: missing; run `otclip repair {self.root}`")
        reader = MetadataStore(self.store_path, readonly=True)
        if reader.schema_version() < SCHEMA_VERSION:
            try:
                MetadataStore(self.store_path).close()  # migrates
            except sqlite3.OperationalError:  # a read-only disk: searching works, filters on new columns do not
                return reader
            reader.close()
            reader = MetadataStore(self.store_path, readonly=True)
        return reader

    def store_problem(self) -> str | None:
        """What is wrong with metadata.sqlite (missing though the index holds data, or damaged), or None."""
        if not self.store_path.exists():
            return f"{self.store_path}: missing" if self._holds_data() else None
        try:
            return self.store.problem()
        except IndexDirectoryError as exc:
            return str(exc)

    def _holds_data(self) -> bool:
        return any(self.embeddings_dir.glob("*.npy")) or (self.exists() and bool(self.manifest()["sides"]))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def records_dir(self) -> Path:
        return self.embeddings_dir / "records"

    @property
    def records(self) -> RecordsLog:
        return RecordsLog(self.records_dir)

    def write_chunk(self, name: str, side: str, embeddings: np.ndarray, records: list[ItemRecord]) -> None:
        """Persist a chunk: embeddings first, then its records; a chunk with records is complete."""
        write_npy_atomically(self.embeddings_dir / f"{name}.npy", np.asarray(embeddings, np.float32))
        write_json_atomically(self.embeddings_dir / f"{name}.json",
                              chunk_payload(side, self.manifest()["model"], records))

    def ingest_chunk(self, name: str) -> int:
        """Commit one written chunk: its records into SQLite (idempotent), then its records file is kept (see
        records_log) while one of its rows is current. Returns the rows stored."""
        chunk_file = self.embeddings_dir / f"{name}.json"
        count = 0
        if not self.store.chunk_ingested(name):
            entry = read_entry(chunk_file)
            count = self.store.ingest_chunk(name, entry.side, entry.records)
        self.records.adopt(chunk_file)
        return count

    def ingest_pending(self) -> int:
        """Commit every written chunk (a killed run's too), keep records files for the rows no kept file holds,
        and drop the chunks and records files nothing needs any more. Returns the rows stored."""
        ingested = sum(self.ingest_chunk(path.stem) for path in in_order(self.embeddings_dir.glob("*.json")))
        live, removals = self.store.live_chunks(), self.store.kept_removals()  # (a scan of the chunk index)
        lost = (live | removals) - self.records.names()
        if lost & removals:
            self.rewrite_records()  # which items a lost removal removed is not known: keep the rows as they are
            renamed = True
        else:
            self.store.forget_chunks(lost)
            renamed = self._write_records_of_unheld_rows() > 0
        if renamed:  # rows now name new records files
            live = self.store.live_chunks()
        self._drop_unused(live)
        return ingested

    def remove_items(self, side: str, keys: list[str], retire: bool = False) -> None:
        """Forget these items: a removal records file first (a rebuild must not bring them back), then SQLite.
        `retire`: keep the embeddings (and thumbnails) of contents no item holds any more for RETIRED_DAYS, so a
        file that comes back (a drive mounted again, a folder moved out and back) is not embedded again."""
        if keys:
            self.store.delete_keys(side, keys, removal=self.records.write_removal(side, keys), retire=retire)

    def expire_retired(self, now: float | None = None) -> int:
        """Forget retired contents older than RETIRED_DAYS and delete their thumbnails (their embedding chunks go
        at the next `ingest_pending`, when no item uses them either). Returns how many."""
        expired = self.store.forget_retired(before=(now or time.time()) - RETIRED_DAYS * 86400)
        if expired:
            self.prune_thumbnails()
        return expired

    def _write_records_of_unheld_rows(self) -> int:
        """Records files for the rows no kept records file holds (an index built before records were kept,
        or whose file was lost). Returns how many files."""
        model, written = self.manifest()["model"], 0
        for side, records in self.store.records_without_chunk().items():
            for name, keys in self.records.write_rows(side, model, records):
                self.store.assign_chunk(side, keys, name)
                written += 1
        return written

    def _drop_unused(self, live: set[str]) -> None:
        """Delete embedding chunks no row uses, and the records files a rebuild no longer needs (`live`: the
        chunks whose records file writes a current row)."""
        referenced = self.store.referenced_shards()  # (killed runs' temp files: `writing` removes them)
        for npy in self.embeddings_dir.glob("*.npy"):
            if npy.stem not in referenced and not (self.embeddings_dir / f"{npy.stem}.json").exists():
                npy.unlink()  # a chunk cut off before its records were written, or no longer used
        self.store.forget_removals(self.records.prune(live))

    def missing_records(self) -> set[str]:
        """Records files that are lost although a rebuild needs them: of chunks that wrote current rows, and
        removals still kept (`repair` writes the records of every current row again)."""
        return (self.store.live_chunks() | self.store.kept_removals()) - self.records.names()

    def rewrite_records(self) -> int:
        """Replace every kept records file by a snapshot of the store's current rows (a removal's keys or a
        row's fields may be what a damaged file lost: a snapshot needs neither). Returns the files written."""
        old = self.records.paths()
        self.store.forget_chunks(self.store.live_chunks())
        written = self._write_records_of_unheld_rows()
        for path in old:
            path.unlink(missing_ok=True)
        self.store.forget_removals(self.store.kept_removals())
        return written

    def rebuild_store(self) -> dict:
        """Replace a missing or damaged metadata.sqlite by replaying the kept records files in the order they
        were written (upserts and removals). The damaged file is kept beside it (`metadata.sqlite.damaged-TIME`);
        the new one is built under a temporary name and renamed into place. Item ids change, so every side
        must be published again. Returns counts: items per side, records files replayed, unreadable ones."""
        if not any(self.records_dir.glob("*.json")) and any(self.embeddings_dir.glob("*.npy")):
            raise IndexDirectoryError(
                f"{self.store_path}: cannot be rebuilt: the index keeps no records files (made before otclip kept "
                f"them); nothing was changed. Restore the file, or index the collection again into a new directory")
        self.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            damaged = Path(f"{self.store_path}{suffix}")
            if damaged.exists():
                os.replace(damaged, f"{self.store_path}.damaged-{stamp}{suffix}")
        tmp = self.root / f".{self.store_path.name}.tmp{os.getpid()}"
        rebuilt = MetadataStore(tmp)
        replayed, unreadable = 0, []
        try:
            for path in self.records.paths():
                try:
                    entry = read_entry(path)
                except (ValueError, OSError) as exc:
                    unreadable.append(f"{path.name} ({exc})")
                    continue
                if entry.removed is not None:
                    rebuilt.delete_keys(entry.side, entry.removed, removal=entry.name)
                else:
                    rebuilt.ingest_chunk(entry.name, entry.side, entry.records)
                replayed += 1
            items = {side: rebuilt.count(side) for side in SIDES}
        finally:
            rebuilt.close()  # the last connection: SQLite checkpoints and removes its WAL
        os.replace(tmp, self.store_path)
        return {"items": items, "replayed": replayed, "unreadable": unreadable}

    def rebuild_manifest(self) -> dict:
        """Write a missing or unreadable manifest.json again: the model named by the newest records file, the
        dimension of the embedding chunks, no sides (publish each one next). The old file is kept beside it."""
        model = self.records.newest_model(list(self.embeddings_dir.glob("*.json")))
        dims = {_chunk_dim(npy) for npy in self.embeddings_dir.glob("*.npy")} - {None}
        if model is None or len(dims) != 1:
            raise IndexDirectoryError(f"{self.manifest_path}: cannot be rebuilt (no records file names the model, or "
                                      "no embedding chunk gives the dimension); build a new index")
        if self.manifest_path.exists():
            os.replace(self.manifest_path, f"{self.manifest_path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        self.open_for_model(model["spec"], ModelIdentity(model["name"], model["checksum"]), dims.pop())
        return model

    def damaged_chunks(self) -> dict[str, str]:
        """Embedding chunks the metadata store relies on that are missing, unreadable, of another dimension or
        cut short: chunk name -> what is wrong. Searching still works (FAISS keeps its own copy); rebuilding
        would fail, so `index` drops and re-embeds their items and `reindex` refuses."""
        return self._damaged(self.store.rows_needed())

    def _damaged(self, rows_needed: dict[str, int]) -> dict[str, str]:
        """Of these chunks (shard -> rows needed), the missing, unreadable, of another dimension or cut short."""
        dim = self.manifest()["dim"]
        damaged = {}
        for shard, rows in rows_needed.items():
            path = self.embeddings_dir / f"{shard}.npy"
            try:
                array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                damaged[shard] = "missing"
                continue
            except (ValueError, OSError) as exc:
                damaged[shard] = f"unreadable ({exc})"
                continue
            if array.ndim != 2 or array.shape[1] != dim:
                damaged[shard] = f"shape {array.shape}, expected (rows, {dim})"
            elif len(array) < rows:
                damaged[shard] = f"{len(array)} rows, the index needs {rows}"
        return damaged

    def drop_damaged_chunks(self) -> dict[str, list[str]]:
        """Forget the items of damaged chunks (side -> their keys) and delete the chunks: the next `index` /
        `index-texts` of the same source embeds exactly these items again. Retired contents whose embedding cannot
        be read are forgotten too (a cache: such a content is embedded again if it comes back)."""
        damaged = self.damaged_chunks()
        dropped = self.store.keys_in_shards(damaged)
        for side, keys in dropped.items():
            self.remove_items(side, keys)
        for shard in damaged:
            (self.embeddings_dir / f"{shard}.npy").unlink(missing_ok=True)
        self.store.forget_retired(shards=self._damaged(self.store.rows_needed("retired")))
        return dropped

    def unique_embeddings(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, d) vectors): one vector per distinct content, read from the embedding chunks."""
        entries = self.store.unique_vectors(side)
        dim = self.manifest()["dim"]
        if not entries:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.array([e[0] for e in entries], np.int64), self.vectors_at([(shard, row) for _, shard, row in entries])

    def _copy_vectors(self, path: Path, locations: list[tuple[str, int]]) -> None:
        """Write the embeddings at these locations, in order, as one .npy (atomically), ADD_BLOCK rows at a time."""
        dim = self.manifest()["dim"]
        if not locations:
            write_npy_atomically(path, np.zeros((0, dim), np.float32))
            return

        def write(tmp: str) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(locations), dim))
            for start in range(0, len(locations), ADD_BLOCK):
                out[start : start + ADD_BLOCK] = self.vectors_at(locations[start : start + ADD_BLOCK])
            out.flush()
            del out

        write_atomically(path, write)

    def vectors_at(self, locations: list[tuple[str, int]]) -> np.ndarray:
        """(n, d) stored embeddings at these (chunk, row) locations, read from the memory-mapped chunks."""
        vectors = np.empty((len(locations), self.manifest()["dim"]), np.float32)
        by_chunk: dict[str, list[int]] = {}
        for i, (shard, _) in enumerate(locations):
            by_chunk.setdefault(shard, []).append(i)
        for shard, positions in by_chunk.items():
            chunk = np.load(self.embeddings_dir / f"{shard}.npy", mmap_mode="r")
            vectors[positions] = chunk[[locations[i][1] for i in positions]]
        return vectors

    # --- FAISS sides -------------------------------------------------------------------------
    def publish(self, side: str, factory: str = "auto", progress: bool = False,
                max_index_memory: int | None = None, ranks: Ranks | None = None) -> dict | None:
        """(Re)build the FAISS index of a side from the stored embeddings and commit it via the manifest. `auto`
        stays within the index's memory budget: `max_index_memory` bytes when given (0: none), else the one the
        manifest keeps; a new budget is kept only once an index was built within it. The vectors are copied from
        the chunks into the new `.vectors.npy` a block at a time, and the index is built from that file,
        memory-mapped: RAM holds the index and one block, not every vector (an IVF index whose lists pass
        PART_BYTES: one part of its lists, `_add_in_parts`).

        Under torchrun every rank calls it (`ranks`): rank 0 copies the vectors and trains the index; each rank
        adds its consecutive share of the rows to a copy of it and writes it as a shard file; rank 0 merges the
        shards in rank order (`merge_shard_files`: an IVF index's lists on disk, into `{side}-{gen}.ivfdata`, so
        rank 0's RAM never holds the index), commits, and returns the side's entry (other ranks: None). An index
        whose shards cannot merge (HNSW) is filled by rank 0 alone."""
        ranks = ranks or Ranks()
        if not ranks.is_main:
            plan = ranks.gather(None)[0]
            if plan.get("shared"):
                self._add_shard(side, plan["generation"], ranks)
            return None
        entries = self.store.unique_vectors(side)
        ids = np.array([e[0] for e in entries], np.int64)
        manifest = self.manifest()
        old = manifest["sides"].get(side)
        # after the next of every generation on disk: a rebuilt manifest must not reuse a file a server may hold
        generation = 1 + max([old["generation"] if old else 0, *self._generations_on_disk(side)])
        vectors_path = self._generation_file(side, generation, ".vectors.npy")
        budget = manifest.get("max_index_memory") if max_index_memory is None else (max_index_memory or None)
        shared = False
        try:
            self._copy_vectors(vectors_path, [(shard, row) for _, shard, row in entries])
            vectors = np.load(vectors_path, mmap_mode="r")
            index, used = train_index(vectors, factory, max_bytes=budget)
            shared = ranks.distributed and mergeable(index) and len(ids) >= ranks.world_size
            if shared:
                save_index(index, self._generation_file(side, generation, TRAINED_SUFFIX))
        except BaseException:
            vectors_path.unlink(missing_ok=True)  # no generation without its index
            ranks.gather({"shared": False})  # the other ranks go on to the end; this one raises
            raise
        ranks.gather({"shared": shared, "generation": generation})
        if shared:
            index = self._add_shard(side, generation, ranks, progress)
        else:
            index = self._add_in_parts(side, generation, index, vectors, progress)
        save_index(index, self._generation_file(side, generation, ".faiss"))
        lists = on_disk_lists(index)
        if lists is not None:  # written through a mapping: on the disk before the manifest names it
            sync_file(lists.filename)
        write_npy_atomically(self._generation_file(side, generation, ".ids.npy"), ids)
        manifest["sides"][side] = {
            "factory": used,
            "index_type": index_description(index),
            "vectors": int(len(ids)),
            "items": self.store.count(side),
            "generation": generation,
            "updated": time.time(),
            "max_index_memory": budget if factory == "auto" else None,  # the budget `auto` kept to
            "index_bytes": self._index_bytes(side, generation),
            "lists_on_disk": lists is not None,  # the lists are the .ivfdata file, always memory-mapped
            "ranks": ranks.world_size if shared else 1,  # torchrun ranks that added rows as shards, merged in order
        }
        manifest["max_index_memory"] = budget
        if budget is None:
            del manifest["max_index_memory"]
        write_json_atomically(self.manifest_path, manifest)
        for stale in self._generations_on_disk(side) - {generation}:
            for suffix in SIDE_FILES:
                self._generation_file(side, stale, suffix).unlink(missing_ok=True)
        return manifest["sides"][side]

    def _add_shard(self, side: str, generation: int, ranks: Ranks, progress: bool = False) -> faiss.Index | None:
        """This rank's share of a sharded build (`publish`): rows [rank n / W, (rank + 1) n / W) of the
        generation's vectors file added to the trained index and written as the rank's shard file. Rank 0 then
        merges the shards in rank order (`merge_shard_files`) and returns the index (the others return None)."""
        vectors = np.load(self._generation_file(side, generation, ".vectors.npy"), mmap_mode="r")
        self._write_shard(side, generation, vectors, ranks.rank, ranks.world_size, progress)
        ranks.barrier()  # every shard written
        return self._merge_shards(side, generation, ranks.world_size) if ranks.is_main else None

    def _add_in_parts(self, side: str, generation: int, index: faiss.Index, vectors: np.ndarray,
                      progress: bool) -> faiss.Index:
        """The rows added to the trained `index` in one process. An IVF index whose lists would pass PART_BYTES
        gets them as a sharded build does, one part of consecutive rows after another, each written as a shard
        file and all merged on disk into `{side}-{gen}.ivfdata`: RAM holds one part's lists, not the index's
        (which is then served memory-mapped); the lists are those of one `add` of every row."""
        entry = list_entry_bytes(index)
        parts = 1 if entry is None else -(-len(vectors) * entry // PART_BYTES)
        if parts <= 1:
            return add_rows(index, vectors, progress=progress)
        save_index(index, self._generation_file(side, generation, TRAINED_SUFFIX))
        for part in tqdm(range(parts), desc="adding in parts", unit="part", disable=not progress):
            self._write_shard(side, generation, vectors, part, parts)
        return self._merge_shards(side, generation, parts)

    def _write_shard(self, side: str, generation: int, vectors: np.ndarray, part: int, parts: int,
                     progress: bool = False) -> None:
        """Rows [part n / parts, (part + 1) n / parts) added to a copy of the trained index, saved as shard `part`."""
        start, stop = (len(vectors) * r // parts for r in (part, part + 1))
        trained = load_index(self._generation_file(side, generation, TRAINED_SUFFIX), use_gpu=False)
        shard = add_rows(trained, vectors, start, stop, progress=progress)
        save_index(shard, self._generation_file(side, generation, f".shard-{part}.faiss"))

    def _merge_shards(self, side: str, generation: int, parts: int) -> faiss.Index:
        """The shard files merged in order (`merge_shard_files`), then removed with the trained index."""
        trained = self._generation_file(side, generation, TRAINED_SUFFIX)
        paths = [self._generation_file(side, generation, f".shard-{part}.faiss") for part in range(parts)]
        merged = merge_shard_files(load_index(trained, use_gpu=False), paths,
                                   self._generation_file(side, generation, ".ivfdata"))
        for path in [trained, *paths]:
            path.unlink()
        return merged

    def _generations_on_disk(self, side: str) -> set[int]:
        """Generations with an index or lists file (a killed sharded build may leave only the lists)."""
        return {number for number, _ in self._generation_paths(side, (".faiss", ".ivfdata"))}

    def _generation_paths(self, side: str, suffixes: tuple[str, ...]) -> Iterator[tuple[int, Path]]:
        """(generation, path) of each `{side}-{gen}{suffix}` file in the directory."""
        for suffix in suffixes:
            for path in self.root.glob(f"{side}-*{suffix}"):
                number = path.name[len(side) + 1 : -len(suffix)]
                if number.isdigit():
                    yield int(number), path

    def side_file(self, side: str, suffix: str) -> Path:
        """A file of the published generation of a side (SIDE_FILES)."""
        return self._generation_file(side, self.manifest()["sides"][side]["generation"], suffix)

    def index_bytes(self, side: str) -> int:
        """Bytes of the published index of a side: its .faiss file and, when built as merged shards, its lists."""
        return self._index_bytes(side, self.manifest()["sides"][side]["generation"])

    def _index_bytes(self, side: str, generation: int) -> int:
        lists = self._generation_file(side, generation, ".ivfdata")
        index = self._generation_file(side, generation, ".faiss")
        return index.stat().st_size + (lists.stat().st_size if lists.exists() else 0)

    def _generation_file(self, side: str, generation: int, suffix: str) -> Path:
        return self.root / f"{side}-{generation}{suffix}"

    def load_side(self, side: str, use_gpu: bool = True, mmap: bool = False) -> LoadedSide | None:
        """The published FAISS index of a side with its ids and vectors, or None when the side was never built.
        Its vectors are None when that file is missing (an index published before otclip kept it). `mmap`: the
        index's codes stay in its file, memory-mapped (`load_index`); the vectors file always does."""
        if side not in SIDES:
            raise ValueError(f"side {side!r}: expected one of {SIDES}")
        info = self.manifest()["sides"].get(side)
        if info is None:
            return None
        gen = info["generation"]  # one manifest read for the three files
        path = self._generation_file(side, gen, ".faiss")
        try:
            lists = self._generation_file(side, gen, ".ivfdata")
            if info.get("lists_on_disk") and not lists.exists():  # else FAISS's multi-line error about its open
                raise ValueError(f"{lists}: missing (the index's inverted lists)")
            index = load_index(path, use_gpu=use_gpu, mmap=mmap)
            path = self._generation_file(side, gen, ".ids.npy")
            ids = np.load(path)
            if ids.shape != (index.ntotal,):
                raise ValueError(f"{ids.shape[0] if ids.ndim else 0} ids for {index.ntotal} vectors")
            path = self._generation_file(side, gen, ".vectors.npy")
            vectors = np.load(path, mmap_mode="r") if path.exists() else None
            if vectors is not None and (vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32):
                raise ValueError(f"{vectors.shape} {vectors.dtype} vectors for an index of {index.ntotal} x {index.d}")
            rerank = rerank_factor(new_index(info["factory"], index.d))  # judged by its factory: no GPU copy made
        except (RuntimeError, ValueError, OSError, EOFError) as exc:  # truncated or damaged: it can be rebuilt
            first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            raise IndexDirectoryError(f"{path}: damaged ({first}); rebuild it from the stored embeddings with "
                                      f"`otclip reindex {self.root} --factory {info['factory']}`") from None
        return LoadedSide(index, ids, vectors, rerank)

    # --- thumbnails ----------------------------------------------------------------------------
    @property
    def thumbnails_dir(self) -> Path:
        return self.root / "thumbnails"

    def thumbnail_path(self, sha256: str) -> Path:
        """Where the display copy of this image content lives (whether or not it was made)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"{sha256!r}: not a sha256 hex digest")
        return self.thumbnails_dir / sha256[:2] / f"{sha256}.jpg"

    def write_thumbnail(self, sha256: str, jpeg: bytes, replace: bool = False) -> None:
        path = self.thumbnail_path(sha256)
        if replace or not path.exists():
            write_bytes_atomically(path, jpeg)

    def damaged_thumbnails(self) -> dict[str, str]:
        """sha256 -> an indexed path holding it, for each image content whose kept thumbnail is missing or cut
        short (a JPEG ends with its EOI marker, FF D9). Only for an index that keeps thumbnails."""
        if not self.thumbnails_dir.exists():
            return {}
        damaged = {}
        for key, row in self.store.stats("images").items():
            path = self.thumbnail_path(row["sha256"])
            if row["sha256"] not in damaged and not _whole_jpeg(path):
                damaged[row["sha256"]] = key
        return damaged

    def prune_thumbnails(self) -> int:
        """Delete the thumbnails of content no indexed image holds any more (nor keeps retired); returns how many."""
        if not self.thumbnails_dir.exists():
            return 0
        keep = set(self.store.hash_locations("images")) | set(self.store.retired("images"))
        removed = 0
        for path in self.thumbnails_dir.glob("*/*.jpg"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- the exported query towers ------------------------------------------------------------
    @property
    def query_dir(self) -> Path:
        return self.root / "query"

    def publish_query_model(self, tower: str, files: dict[str, Path], info: dict, link: bool = False) -> None:
        """Keep a checked export of a query tower ("text": text.onnx + its weights + tokenizer.json; "image":
        image.onnx + its weights): the files first, TOWER.json (naming the model and the files' sizes) last.
        `link`: hard-link them (from the per-model cache, `query_model_cache`)."""
        publish_file_set(self.query_dir, f"{tower}.json", files, info, link)

    def refuse_query_model(self, tower: str, reason: str, checksum: str) -> None:
        """Record why this model's `tower` cannot be exported, so later runs neither retry (loading the model
        to fail again) nor stay silent about it."""
        self.publish_query_model(tower, {}, {"refused": reason, "model_checksum": checksum})

    def query_model_refused(self, tower: str) -> str | None:
        """Why the export of this index's model was refused, when a run recorded it."""
        found = self._query_model_set(tower)
        return found[1].get("refused") if found is not None else None

    def query_model_files(self, tower: str) -> tuple[dict[str, Path], dict] | None:
        """({name: path}, info) when a complete export of this index's model is kept for `tower`, else None."""
        found = self._query_model_set(tower)
        return found if found is not None and "refused" not in found[1] else None

    def _query_model_set(self, tower: str) -> tuple[dict[str, Path], dict] | None:
        found = read_file_set(self.query_dir, f"{tower}.json")
        if found is None or found[1].get("model_checksum") != self.manifest()["model"]["checksum"]:
            return None
        return found

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def _chunk_dim(path: Path) -> int | None:
    """The dimension of an embedding chunk's vectors (its header only), or None for an unreadable one."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    return array.shape[1] if array.ndim == 2 else None


def _whole_jpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return False
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"
    except OSError:
        return False
