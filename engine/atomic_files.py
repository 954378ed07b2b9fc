"""Atomic file writes: write a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .processes import process_exists

if TYPE_CHECKING:
    import numpy as np


def write_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        sync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_dead_writers_files(folder: str | Path) -> int:
    """Delete the temporary files (`.NAME.tmpPID`, as `write_atomically` and `save_checkpoint` name them) whose
    writer is gone: a run killed before its rename, which nothing will finish (a checkpoint's is 100+ MB). A file
    of a live process is kept, so no lock is needed. Returns how many were deleted."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def sync_file(path: str | Path) -> None:
    """Put the file's written pages on the disk (also those written through a memory mapping)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomically(path: str | Path, data) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)

    return write_atomically(path, write)


def write_npy_atomically(path: str | Path, array: np.ndarray) -> Path:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return write_atomically(path, write)


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def write_lines_atomically(path: str | Path, lines: list[str]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    return write_atomically(path, write)


def publish_file_set(folder: str | Path, listing: str, files: dict[str, Path], info: dict, link: bool = False) -> None:
    """Put `files` (name -> source) into `folder`, each atomically, then `listing` (a JSON file: `info` plus
    every file's size) last: the set's commit point, removed first so that no reader pairs an old listing
    with new files. `link`: hard-link the sources where the file system allows (immutable files shared
    with another folder), else copy."""
    folder = Path(folder)
    (folder / listing).unlink(missing_ok=True)
    sizes = {}
    for name, source in files.items():
        write_atomically(folder / name, lambda tmp, source=source: _link_or_copy(source, tmp, link))
        sizes[name] = (folder / name).stat().st_size
    write_json_atomically(folder / listing, {**info, "file_bytes": sizes})


def read_file_set(folder: str | Path, listing: str) -> tuple[dict[str, Path], dict] | None:
    """({name: path}, info) of a set `publish_file_set` completed, with every file at its listed size; else
    None (no listing, an unreadable one, a file missing or cut short)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / listing).read_text(encoding="utf-8"))
        sizes = info["file_bytes"]
        complete = all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return ({name: folder / name for name in sizes}, info) if complete else None


def _link_or_copy(source: Path, target: str, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed: a copy
            pass
    shutil.copyfile(source, target)
