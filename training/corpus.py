"""Partially-paired corpora: a manifest (CSV, JSONL or Parquet) with columns `image` (path), `text`, optional
`label` and `split` (an index's manifest, with `path` and `caption`, reads alike). A row with both image and text is a
pair; a row with one of them is unpaired. Validated up front: nothing starts half-way on a bad corpus."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from otclip.engine.image_paths import URL_REASON, is_url
from otclip.engine.manifests import MANIFEST_SUFFIXES, read_rows, with_aliases

KNOWN_COLUMNS = {"image", "text", "label", "split"}
INDEX_COLUMNS = {"path": "image", "caption": "text"}  # an index's manifest's names for them (`otclip index`)
MAX_LISTED = 5


class CorpusError(ValueError):
    """A corpus that cannot be trained on; the message lists the first offending rows."""


@dataclass
class CorpusRow:
    image: str | None
    text: str | None
    label: str | None = None
    split: str | None = None


@dataclass
class PartiallyPairedCorpus:
    pairs: list[CorpusRow] = field(default_factory=list)
    images: list[CorpusRow] = field(default_factory=list)  # unpaired images
    texts: list[CorpusRow] = field(default_factory=list)  # unpaired texts
    source: str = ""

    def summary(self) -> str:
        return f"{self.source}: {len(self.pairs)} pairs, {len(self.images)} unpaired images, {len(self.texts)} unpaired texts"


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise CorpusError(f"{path}: corpus manifest must be {', '.join(MANIFEST_SUFFIXES)}")
    try:
        return read_rows(path)
    except ValueError as exc:
        raise CorpusError(str(exc)) from None


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def load_corpus(path: str | Path, split: str | None = None, require_pairs: bool = True) -> PartiallyPairedCorpus:
    """Read and validate a manifest; relative image paths are relative to the manifest's folder (made absolute).
    With `split`, only rows whose `split` column equals it are kept. Unknown columns are refused (a misspelt
    `text` would leave every image unpaired), but for an index's manifest (`path`, `caption`), whose other columns
    are the photos' metadata."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus manifest not found")
    raw = _read_rows(path)
    rows = with_aliases(raw, INDEX_COLUMNS)
    problems: list[str] = []
    if rows:
        unknown = set(rows[0]) - KNOWN_COLUMNS
        columns = set().union(*raw)
        if unknown and not ("path" in columns and "image" not in columns):  # an index's manifest: its metadata
            problems.append(f"unknown columns {sorted(unknown)} (expected {sorted(KNOWN_COLUMNS)})")
    corpus = PartiallyPairedCorpus(source=str(path))
    for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        if split is not None and row.get("split") not in (split, None, ""):
            continue
        image, text = row.get("image"), row.get("text")
        if _blank(image) and _blank(text):
            problems.append(f"row {number}: neither image nor text")
            continue
        if "text" in row and text is not None and not _blank(image) and isinstance(text, str) and text != "" and not text.strip():
            problems.append(f"row {number}: empty text")
            continue
        if not _blank(image) and is_url(str(image)):
            problems.append(f"row {number}: image {image} is {URL_REASON}")
            continue
        if not _blank(image):
            p = Path(str(image))
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                problems.append(f"row {number}: image {image} not found")
                continue
            image = os.path.abspath(p)  # as an index stores it: `eval --index` finds the corpus's images by path
        item = CorpusRow(None if _blank(image) else image, None if _blank(text) else str(text).strip(),
                         None if _blank(row.get("label")) else str(row["label"]), row.get("split"))
        (corpus.pairs if item.image and item.text else corpus.images if item.image else corpus.texts).append(item)
    if require_pairs and not corpus.pairs and not problems:
        problems.append("no pairs at all: at least a few rows need both an image and a text")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise CorpusError(f"{path}: {listed}{more}")
    return corpus
