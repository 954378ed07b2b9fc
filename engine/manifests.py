"""Reading tabular manifests (CSV, JSONL, Parquet) into rows: shared by image collections, text
corpora and training corpora."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a manifest as dicts. A malformed JSONL line, a JSONL line that is not an object, or a
    CSV/JSONL that is not UTF-8 is a ValueError naming the file (and line). A byte-order mark is read past ("utf-8-sig":
    Excel's "CSV UTF-8" starts with one, and its first column had been named "\ufeffpath", refused as no 'path')."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                delimiter = _delimiter(f.readline())
                f.seek(0)
                return list(csv.DictReader(f, delimiter=delimiter))
        if suffix == ".jsonl":
            return _jsonl_rows(path)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported manifest type; use {', '.join(MANIFEST_SUFFIXES)}")


def _delimiter(header: str) -> str:
    """The CSV's separator, as its header line uses it: a comma, or a semicolon (what Excel writes where the comma is
    the decimal mark: "path;caption" had been one column, refused as no 'path'), or a tab; a comma when tied."""
    return max((",", ";", "\t"), key=header.count)


def read_lines(path: str | Path) -> list[str]:
    """A plain text file's non-blank lines, stripped; a file that is not UTF-8 is a ValueError naming it (the bare
    codec error had named neither the file nor what to do)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as exc:
        raise _not_utf8(Path(path), exc) from None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as "
                      "UTF-8")


def with_aliases(rows: list[dict], aliases: dict[str, str]) -> list[dict]:
    """`rows` with each column named by an alias (alias -> column) renamed to its column, where the file lacks that
    column: one manifest serves both readers (an index's `path` and `caption`, a training corpus's `image` and
    `text`). A file that has the column keeps the alias as a column of its own (an index keeps it as metadata)."""
    columns = set().union(*rows) if rows else set()
    renames = {alias: column for alias, column in aliases.items() if alias in columns and column not in columns}
    if not renames:
        return rows
    return [{renames.get(key, key): value for key, value in row.items()} for row in rows]


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a row must be a JSON object like {{\"path\": ...}}, "
                                 f"not {type(row).__name__}")
            rows.append(row)
    return rows
