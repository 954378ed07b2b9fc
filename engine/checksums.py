"""Content checksums used for model identity and file de-duplication."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic_files import write_lines_atomically
from .cache_dir import cache_dir

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=64)
def _cached_file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Memoised in the process and on disk (cache_dir()/file-sha256/): hashing 100 MB of weights on
    every run would be most of a no-op re-index's time."""
    memo = cache_dir() / "file-sha256" / hashlib.sha256(f"{path}|{size}|{mtime_ns}".encode()).hexdigest()
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        write_lines_atomically(memo, [digest])
    except OSError:  # a read-only cache only costs the hashing again
        pass
    return digest


def memoised_file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, memoised per (path, size, mtime) since weight files are large."""
    st = Path(path).stat()
    return _cached_file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hex sha256 over a module's tensors (names, shapes and float32 CPU bytes), in order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
