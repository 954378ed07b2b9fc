"""Content checksums used for model identity and file de-duplication."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

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
    return sha256_file(path)


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
