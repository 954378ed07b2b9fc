"""Atomic file writes: write a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def write_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp over `path`: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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


def write_lines_atomically(path: str | Path, lines: list[str]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    return write_atomically(path, write)
