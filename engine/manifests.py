"""Reading tabular manifests (CSV, JSONL, Parquet) into rows: shared by image collections, text
corpora and training corpora."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a manifest as dicts; a malformed JSONL line is a ValueError naming path:line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported manifest type; use {', '.join(MANIFEST_SUFFIXES)}")
