"""A real index directory of synthetic unit vectors (FAISS on disk, SQLite), for tests that need no model."""

from __future__ import annotations

import numpy as np

from otclip.engine.index_directory import IndexDirectory
from otclip.engine.metadata_store import ItemRecord
from otclip.engine.model_identity import ModelIdentity

DIM = 16


def clustered(n: int, seed: int) -> np.ndarray:
    """n unit vectors of DIM dimensions around 40 centres."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, DIM))[rng.integers(0, 40, n)] + 0.7 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_index(root, vectors: np.ndarray, factory: str) -> IndexDirectory:
    """An index of these vectors as images /p/{i}.jpg, published with `factory`."""
    directory = IndexDirectory(root)
    with directory.writing():
        directory.open_for_model("synthetic", ModelIdentity("synthetic", "0" * 64), vectors.shape[1])
        directory.ingest_pending()
        directory.write_chunk("c0", "images", vectors,
                              [ItemRecord(key=f"/p/{i}.jpg", sha256=f"{i:064x}", row=i) for i in range(len(vectors))])
        directory.ingest_pending()
        directory.publish("images", factory)
    return directory
