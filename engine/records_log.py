"""The records files of an index (INDEX_DIR/embeddings/records/): which rows each embedding chunk wrote into the
metadata store, and which items were removed, in the order it happened. Replayed, they rebuild the store.

  SIDE-TIME_NS-rRANK-NNNNNN.json  {"side", "model", "records": [ItemRecord fields]}  a chunk's rows
  SIDE-TIME_NS-r0-kept.json       the same, for rows no other file held (older indexes, repairs)
  SIDE-TIME_NS-removed.json       {"side", "removed": [keys]}
Files sort by TIME_NS, the order they were written in. A chunk's file is the one its run wrote beside its
vectors (embeddings/NAME.json), moved here once SQLite holds its rows. Only `IndexDirectory` uses this module.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic_files import write_json_atomically
from .metadata_store import ItemRecord

PER_FILE = 50_000  # rows in one snapshot file


@dataclass
class Entry:
    """One records file, read back: rows to store (`records`) or keys to delete (`removed`)."""

    name: str
    side: str
    records: list[ItemRecord] | None = None
    removed: list[str] | None = None
    model: dict | None = None


def chunk_payload(side: str, model: dict, records: list[ItemRecord]) -> dict:
    return {"side": side, "model": model, "records": [r.__dict__ for r in records]}


def read_entry(path: Path) -> Entry:
    """Raises ValueError for a file that does not parse back (cut short, overwritten)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if is_removal(path):
            return Entry(path.stem, data["side"], removed=list(data["removed"]))
        return Entry(path.stem, data["side"], records=[ItemRecord(**r) for r in data["records"]], model=data["model"])
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a records file ({type(exc).__name__})") from None


def is_removal(path: Path) -> bool:
    return path.stem.endswith("-removed")


def _order(path: Path) -> tuple[int, str]:
    parts = path.stem.split("-")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), path.stem


def in_order(paths) -> list[Path]:
    """Records files (or chunks' files not yet moved here) in the order they were written."""
    return sorted(paths, key=_order)


class RecordsLog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def paths(self) -> list[Path]:
        return in_order(self.folder.glob("*.json"))

    def names(self) -> set[str]:
        return {path.stem for path in self.folder.glob("*.json")}

    def adopt(self, chunk_file: Path) -> None:
        """Keep a chunk's records file (its rows are in SQLite now)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.replace(chunk_file, self.folder / chunk_file.name)

    def write_rows(self, side: str, model: dict, records: list[ItemRecord]) -> list[tuple[str, list[str]]]:
        """Snapshot files of these rows, named as written now: (name, keys) of each file."""
        written = []
        for start in range(0, len(records), PER_FILE):
            part = records[start : start + PER_FILE]
            name = f"{side}-{time.time_ns()}-r0-kept"
            write_json_atomically(self.folder / f"{name}.json", chunk_payload(side, model, part))
            written.append((name, [r.key for r in part]))
        return written

    def write_removal(self, side: str, keys: list[str]) -> str:
        name = f"{side}-{time.time_ns()}-removed"
        write_json_atomically(self.folder / f"{name}.json", {"side": side, "removed": keys})
        return name

    def unreadable(self) -> list[Path]:
        """The files that do not parse back: reads every one."""
        bad = []
        for path in self.paths():
            try:
                read_entry(path)
            except (ValueError, OSError):
                bad.append(path)
        return bad

    def prune(self, live: set[str]) -> list[str]:
        """Delete the chunks' files that write no current row (`live`: the names that do), then the removals
        older than every chunk's file left: nothing older can bring their items back. Returns the removals
        deleted."""
        paths = self.paths()
        for path in paths:
            if not is_removal(path) and path.stem not in live:
                path.unlink()
        oldest = min((_order(p) for p in paths if p.exists() and not is_removal(p)), default=None)
        dropped = [p for p in paths if is_removal(p) and (oldest is None or _order(p) < oldest)]
        for path in dropped:
            path.unlink()
        return [path.stem for path in dropped]

    def newest_model(self, pending: list[Path]) -> dict | None:
        """The model named by the newest readable chunk's file (kept here, or `pending` beside the vectors)."""
        for path in reversed(in_order([*self.folder.glob("*.json"), *pending])):
            if not is_removal(path):
                try:
                    return read_entry(path).model
                except (ValueError, OSError):
                    continue
        return None
