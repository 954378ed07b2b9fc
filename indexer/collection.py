"""Reading what to index: image folders, image manifests (CSV / JSONL / Parquet) and text corpora."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from otclip.engine.exclusions import Exclusions
from otclip.engine.image_folders import image_files
from otclip.engine.image_paths import DOWNLOAD_FIRST, is_url
from otclip.engine.manifests import MANIFEST_SUFFIXES, read_lines, read_rows, with_aliases


@dataclass
class CollectionItem:
    """One image to index: an absolute path and optional metadata from a manifest."""

    path: str
    caption: str | None = None
    label: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TextItem:
    text: str
    label: str | None = None
    extra: dict = field(default_factory=dict)


def walk_images(folder: Path, unreadable: list[dict] | None = None,
                exclusions: Exclusions = Exclusions()) -> list[CollectionItem]:
    """`image_files` below `folder` as items to index."""
    return [CollectionItem(path) for path in image_files(folder, unreadable, exclusions)]


def _clean(value) -> str | None:
    return None if value is None or (isinstance(value, str) and not value.strip()) else str(value)


def read_image_manifest(path: Path) -> list[CollectionItem]:
    """Rows with a `path` column (relative to the manifest's folder) and optional caption, label, others; a training
    corpus's `image` and `text` columns stand for `path` and `caption` where those are missing."""
    rows = with_aliases(read_rows(path), {"image": "path", "text": "caption"})
    if rows and "path" not in rows[0]:
        raise ValueError(f"{path}: manifest has no 'path' column (columns: {', '.join(rows[0])})")
    items = []
    for row in rows:
        if not _clean(row.get("path")):
            continue
        listed = str(row["path"])  # a URL as given: skipped by the run with URL_REASON
        p = Path(listed)
        extra = {k: v for k, v in row.items() if k not in ("path", "caption", "label") and v not in (None, "")}
        items.append(
            CollectionItem(
                listed if is_url(listed) else os.path.abspath(p if p.is_absolute() else path.parent / p),
                _clean(row.get("caption")),
                _clean(row.get("label")),
                json.loads(json.dumps(extra, default=str)),
            )
        )
    if items and all(is_url(item.path) for item in items):
        raise ValueError(f"{path}: its {len(items)} paths are URLs (the first: {items[0].path}); {DOWNLOAD_FIRST} "
                         "and list the files")
    return items


def read_collection(source: str | Path, unreadable: list[dict] | None = None,
                    exclusions: Exclusions = Exclusions()) -> list[CollectionItem]:
    """A folder (walked, less `exclusions`; folders that cannot be listed go to `unreadable`) or a manifest file,
    as a list of images in a stable order (no duplicate paths). A manifest lists what it means: given patterns
    of exclusion are refused for it."""
    source = Path(source)
    if source.is_dir():
        return walk_images(source, unreadable, exclusions)
    if source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        if exclusions != Exclusions():
            raise ValueError(f"{source}: --exclude and --include-hidden apply to a folder, not to a manifest (it "
                             "lists the images to index)")
        items = read_image_manifest(source)
        unique = {item.path: item for item in items}
        return [unique[p] for p in sorted(unique)]
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or manifest")
    raise ValueError(f"{source}: expected a folder of images or a manifest (.csv, .jsonl, .parquet)")


def read_texts(source: str | Path) -> list[TextItem]:
    """A text corpus: .txt (one text per line) or .csv / .jsonl / .parquet with a `text` column."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such text file")
    if source.suffix.lower() in MANIFEST_SUFFIXES:
        rows = read_rows(source)
        if rows and "text" not in rows[0]:
            raise ValueError(f"{source}: has no 'text' column (columns: {', '.join(rows[0])})")
        return [
            TextItem(str(r["text"]).strip(), _clean(r.get("label")),
                     {k: v for k, v in r.items() if k not in ("text", "label") and v not in (None, "")})
            for r in rows
            if _clean(r.get("text"))
        ]
    return [TextItem(line) for line in read_lines(source)]
