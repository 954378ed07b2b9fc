"""Query-tower exports made once per model on this machine: a new index of a model exported before gets the
checked files hard-linked from here instead of exporting again (ViT-B-32-256: about 14 s and 600 MB of
disk for each new index otherwise). Keyed by the model's weights checksum and this code's export version;
a set is used only when every file has its listed size."""

from __future__ import annotations

from pathlib import Path

from .atomic_files import publish_file_set, read_file_set
from .cache_dir import cache_dir

# raise when what an export holds changes: older cached sets are then not used (2: text exports take a length axis)
EXPORT_VERSION = 2


def _folder(checksum: str) -> Path:
    return cache_dir() / "query-models" / f"{checksum}-v{EXPORT_VERSION}"


def cached_query_model(tower: str, checksum: str) -> tuple[dict[str, Path], dict] | None:
    return read_file_set(_folder(checksum), f"{tower}.json")


def cache_query_model(tower: str, checksum: str, files: dict[str, Path], info: dict) -> None:
    """Keep an index's checked export for later indexes (linked; a cache that cannot be written is skipped)."""
    try:
        publish_file_set(_folder(checksum), f"{tower}.json", files, {k: v for k, v in info.items() if k != "file_bytes"},
                         link=True)
    except OSError:
        pass
