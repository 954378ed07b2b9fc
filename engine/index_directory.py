"""The on-disk layout of an otclip index and the only code that reads or writes it.

  INDEX_DIR/manifest.json        format version, model identity, dimension, metric, per side:
                                 factory, counts, generation, updated; replaced atomically (the commit point)
  INDEX_DIR/metadata.sqlite      MetadataStore (one row per image / text)
  INDEX_DIR/embeddings/*.npy     embedding chunks (plain float32 arrays; `reindex` rebuilds from them)
  INDEX_DIR/embeddings/*.json    a chunk's records until it is ingested into SQLite
  INDEX_DIR/{side}-{gen}.faiss   the FAISS index of a side, CPU form
  INDEX_DIR/{side}-{gen}.ids.npy FAISS position -> SQLite id
  INDEX_DIR/errors.jsonl         files skipped by the last run, with reasons
  INDEX_DIR/thumbnails/ab/{sha256}.jpg  a display copy of each distinct image content (app result tiles)
  INDEX_DIR/query/text.onnx      the model's text tower for torch-free text queries (text_query_model),
  INDEX_DIR/query/text.onnx.data ... its weights,
  INDEX_DIR/query/tokenizer.json ... its tokenizer, and
  INDEX_DIR/query/text.json      ... what it was checked against (written last: the export's commit point)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .atomic_files import write_atomically, write_json_atomically, write_npy_atomically
from .errors import IndexDirectoryError
from .faiss_indexes import build_index, index_description, load_index, save_index
from .metadata_store import SIDES, ItemRecord, MetadataStore
from .model_identity import ModelIdentity

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METRIC = "inner_product"


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
        for folder in (self.root, self.embeddings_dir, self.query_dir):
            for leftover in folder.glob(".*.tmp*"):
                leftover.unlink(missing_ok=True)

    # --- manifest ----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.exists():
            raise IndexDirectoryError(f"{self.root}: not an otclip index (no {MANIFEST}); build one with `otclip index`")
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise IndexDirectoryError(f"{self.manifest_path}: unreadable ({type(exc).__name__}: {exc}); restore it "
                                      "from a backup, or build a new index") from None
        if not isinstance(data, dict) or not {"model", "dim", "sides"} <= set(data):
            raise IndexDirectoryError(f"{self.manifest_path}: not an otclip manifest (no model, dim and sides); "
                                      "restore it from a backup, or build a new index")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise IndexDirectoryError(f"{self.root}: index format {data['format_version']} is newer than this otclip")
        return data

    def model_identity(self) -> ModelIdentity:
        m = self.manifest()["model"]
        return ModelIdentity(m["name"], m["checksum"])

    def model_spec(self) -> str:
        return self.manifest()["model"]["spec"]

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

    def check_model(self, identity: ModelIdentity) -> None:
        built = self.model_identity()
        if not built.same_weights(identity):
            raise IndexDirectoryError(
                f"{self.root}: built with model {built}, refusing model {identity}; "
                f"use --model {self.model_spec()} or build a new index"
            )

    # --- metadata and embeddings ---------------------------------------------------------------
    @property
    def store(self) -> MetadataStore:
        """The metadata store, created with a new index. An index that already holds data never gets a
        fresh, empty store: its chunks would then look unreferenced and be deleted (`ingest_pending`)."""
        if self._store is None:
            path = self.root / "metadata.sqlite"
            if not path.exists() and self._holds_data():
                raise IndexDirectoryError(
                    f"{path}: missing, though the index holds embeddings; nothing was changed. Restore the file, "
                    f"or build a new index with `otclip index IMAGES --out NEW_DIR`")
            self.embeddings_dir.mkdir(parents=True, exist_ok=True)
            self._store = MetadataStore(path)
        return self._store

    def _holds_data(self) -> bool:
        return any(self.embeddings_dir.glob("*.npy")) or (self.exists() and bool(self.manifest()["sides"]))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def write_chunk(self, name: str, side: str, embeddings: np.ndarray, records: list[ItemRecord]) -> None:
        """Persist a chunk: embeddings first, then its records; a chunk with records is complete."""
        write_npy_atomically(self.embeddings_dir / f"{name}.npy", np.asarray(embeddings, np.float32))
        write_json_atomically(
            self.embeddings_dir / f"{name}.json", {"side": side, "records": [r.__dict__ for r in records]}
        )

    def ingest_pending(self) -> int:
        """Move every complete chunk's records into SQLite (idempotent) and drop chunks no record uses."""
        ingested = 0
        for sidecar in sorted(self.embeddings_dir.glob("*.json")):
            name = sidecar.stem
            if not self.store.chunk_ingested(name):
                data = json.loads(sidecar.read_text())
                ingested += self.store.ingest_chunk(name, data["side"], [ItemRecord(**r) for r in data["records"]])
            sidecar.unlink()
        referenced = self.store.referenced_shards()  # (killed runs' temp files: `writing` removes them)
        for npy in self.embeddings_dir.glob("*.npy"):
            if npy.stem not in referenced and not (self.embeddings_dir / f"{npy.stem}.json").exists():
                npy.unlink()  # a chunk cut off before its records were written, or no longer used
        return ingested

    def damaged_chunks(self) -> dict[str, str]:
        """Embedding chunks the metadata store relies on that are missing, unreadable, of another dimension or
        cut short: chunk name -> what is wrong. Searching still works (FAISS keeps its own copy); rebuilding
        would fail, so `index` drops and re-embeds their items and `reindex` refuses."""
        dim = self.manifest()["dim"]
        damaged = {}
        for shard, rows in self.store.rows_needed().items():
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
        `index-texts` of the same source embeds exactly these items again."""
        damaged = self.damaged_chunks()
        dropped = self.store.keys_in_shards(damaged)
        for side, keys in dropped.items():
            self.store.delete_keys(side, keys)
        for shard in damaged:
            (self.embeddings_dir / f"{shard}.npy").unlink(missing_ok=True)
        return dropped

    def unique_embeddings(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, d) vectors): one vector per distinct content, read from the embedding chunks."""
        entries = self.store.unique_vectors(side)
        dim = self.manifest()["dim"]
        if not entries:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        cache: dict[str, np.ndarray] = {}
        vectors = np.empty((len(entries), dim), np.float32)
        for i, (_, shard, row) in enumerate(entries):
            if shard not in cache:
                cache[shard] = np.load(self.embeddings_dir / f"{shard}.npy", mmap_mode="r")
            vectors[i] = cache[shard][row]
        return np.array([e[0] for e in entries], np.int64), vectors

    # --- FAISS sides -------------------------------------------------------------------------
    def publish(self, side: str, factory: str = "auto") -> dict:
        """(Re)build the FAISS index of a side from the stored embeddings and commit it via the manifest."""
        ids, vectors = self.unique_embeddings(side)
        index, used = build_index(vectors, factory)
        manifest = self.manifest()
        old = manifest["sides"].get(side)
        generation = (old["generation"] + 1) if old else 1
        save_index(index, self.root / f"{side}-{generation}.faiss")
        write_npy_atomically(self.root / f"{side}-{generation}.ids.npy", ids)
        manifest["sides"][side] = {
            "factory": used,
            "index_type": index_description(index),
            "vectors": int(len(ids)),
            "items": self.store.count(side),
            "generation": generation,
            "updated": time.time(),
        }
        write_json_atomically(self.manifest_path, manifest)
        if old:
            for suffix in (".faiss", ".ids.npy"):
                (self.root / f"{side}-{old['generation']}{suffix}").unlink(missing_ok=True)
        return manifest["sides"][side]

    def load_side(self, side: str, use_gpu: bool = True):
        """(faiss index, ids) of a side, or None when the side was never built."""
        if side not in SIDES:
            raise ValueError(f"side {side!r}: expected one of {SIDES}")
        info = self.manifest()["sides"].get(side)
        if info is None:
            return None
        gen = info["generation"]
        path = self.root / f"{side}-{gen}.faiss"
        try:
            return load_index(path, use_gpu=use_gpu), np.load(self.root / f"{side}-{gen}.ids.npy")
        except (RuntimeError, ValueError, OSError) as exc:  # truncated or damaged: it can be rebuilt
            first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            raise IndexDirectoryError(f"{path}: damaged ({first}); rebuild it from the stored embeddings with "
                                      f"`otclip reindex {self.root} --factory {info['factory']}`") from None

    # --- thumbnails ----------------------------------------------------------------------------
    @property
    def thumbnails_dir(self) -> Path:
        return self.root / "thumbnails"

    def thumbnail_path(self, sha256: str) -> Path:
        """Where the display copy of this image content lives (whether or not it was made)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"{sha256!r}: not a sha256 hex digest")
        return self.thumbnails_dir / sha256[:2] / f"{sha256}.jpg"

    def write_thumbnail(self, sha256: str, jpeg: bytes) -> None:
        path = self.thumbnail_path(sha256)
        if not path.exists():
            write_atomically(path, lambda tmp: Path(tmp).write_bytes(jpeg))

    def prune_thumbnails(self) -> int:
        """Delete the thumbnails of content no indexed image holds any more; returns how many."""
        if not self.thumbnails_dir.exists():
            return 0
        keep = set(self.store.hash_locations("images"))
        removed = 0
        for path in self.thumbnails_dir.glob("*/*.jpg"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- the exported text tower ---------------------------------------------------------------
    @property
    def query_dir(self) -> Path:
        return self.root / "query"

    def publish_text_query_model(self, onnx_path: Path, tokenizer_path: Path, info: dict) -> None:
        """Keep a checked text-tower export (graph, its weights file `text.onnx.data`, tokenizer): the files
        first, text.json (naming the model and the files' sizes) last."""
        target = self.query_dir
        (target / "text.json").unlink(missing_ok=True)  # no reader pairs the old description with new files
        sizes = {}
        for source, name in ((onnx_path.with_name(onnx_path.name + ".data"), "text.onnx.data"),
                             (onnx_path, "text.onnx"), (tokenizer_path, "tokenizer.json")):
            write_atomically(target / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
            sizes[name] = (target / name).stat().st_size
        write_json_atomically(target / "text.json", {**info, "file_bytes": sizes})

    def text_query_model_files(self) -> tuple[Path, Path, dict] | None:
        """(text.onnx, tokenizer.json, info) when a complete export of this index's model is kept, else None."""
        try:
            info = json.loads((self.query_dir / "text.json").read_text())
            complete = all((self.query_dir / name).stat().st_size == size for name, size in info["file_bytes"].items())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not complete or info.get("model_checksum") != self.manifest()["model"]["checksum"]:
            return None
        return self.query_dir / "text.onnx", self.query_dir / "tokenizer.json", info

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
