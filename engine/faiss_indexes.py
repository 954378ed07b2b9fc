"""FAISS index construction, GPU offload and persistence. Indexes hold L2-normalised vectors and
use inner product, so scores are cosine similarities."""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from .atomic_files import write_atomically

EXACT_LIMIT = 50_000  # below this, exact search is fast enough and needs no training
PQ_LIMIT = 2_000_000  # past this, full vectors no longer fit comfortably: compress with PQ
TRAIN_SAMPLE_PER_LIST = 64


def auto_factory(n: int, dim: int) -> str:
    """The factory string `auto` picks for `n` vectors of dimension `dim`."""
    if n < EXACT_LIMIT:
        return "Flat"
    nlist = 2 ** int(round(math.log2(4 * math.sqrt(n))))
    if n < PQ_LIMIT:
        return f"IVF{nlist},Flat"
    m = next(m for m in (64, 48, 32, 24, 16, 8) if dim % m == 0)
    return f"OPQ{m},IVF{nlist},PQ{m}"


HNSW_EF_SEARCH = 128


def default_nprobe(index: faiss.Index) -> int | None:
    ivf = _ivf_of(index)
    return None if ivf is None else max(8, ivf.nlist // 16)


def configure_search(index: faiss.Index) -> faiss.Index:
    """Search-time parameters that trade a little speed for recall@10 near 0.95: IVF lists probed,
    HNSW's candidate list (FAISS's default efSearch of 16 gives poor recall on 384-512-d data)."""
    nprobe = default_nprobe(index)
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = HNSW_EF_SEARCH
    return index


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """All GPUs (sharded when several) if FAISS sees any; HNSW and others without a GPU form stay on CPU."""
    if gpu_count() == 0:
        return index
    try:
        if gpu_count() == 1:
            return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError:
        return index


def _to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if gpu_count() and "Gpu" in type(index).__name__ else index


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a factory string; a one-line error naming a bad one. Indexing
    calls this before embedding anything, so a typo costs nothing."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"factory string {factory!r}: not a valid FAISS index description ({exc})") from None


def build_index(vectors: np.ndarray, factory: str = "auto", seed: int = 0) -> tuple[faiss.Index, str]:
    """Train (on a sample) and fill an inner-product index; returns the CPU index and the factory used.
    Training and adding run on the GPU when FAISS sees one."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    factory = auto_factory(n, dim) if factory == "auto" else factory
    index = new_index(factory, dim)
    work = _to_gpu(index)
    if not work.is_trained:
        ivf = _ivf_of(index)
        needed = ivf.nlist if ivf else 1
        if n < needed:
            raise ValueError(f"factory {factory!r} needs at least {needed} vectors to train; the index has {n}")
        sample_size = min(n, max(10_000, TRAIN_SAMPLE_PER_LIST * (ivf.nlist if ivf else 256)))
        sample = vectors[np.random.default_rng(seed).choice(n, size=sample_size, replace=False)]
        work.train(sample)
    if n:
        work.add(vectors)
    return configure_search(_to_cpu(work)), factory


def save_index(index: faiss.Index, path: str | Path) -> Path:
    return write_atomically(path, lambda tmp: faiss.write_index(index, tmp))


def load_index(path: str | Path, use_gpu: bool = True) -> faiss.Index:
    index = configure_search(faiss.read_index(str(path)))
    return _to_gpu(index) if use_gpu else index


def index_description(index: faiss.Index) -> str:
    return type(_to_cpu(index)).__name__



def best_among(index: faiss.Index, query: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores, positions) of the best k of `positions`, scored exactly, from the index's own exact copies:
    an IVF-Flat index scans every list with a bitmap of the positions (a distance only for those), a Flat
    or HNSW-Flat one hands back their vectors. None when the index keeps only codes (PQ, scalar quantisers)
    or lives on a GPU: filtered search then reads the embedding chunks."""
    index = faiss.downcast_index(index)
    query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    k = min(k, len(positions))
    if k == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if isinstance(index, faiss.IndexIVFFlat):
        mask = np.zeros(index.ntotal, bool)
        mask[positions] = True
        bits = np.packbits(mask, bitorder="little")  # IDSelectorBitmap: bit (i & 7) of byte i >> 3
        selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nlist)
        scores, found = index.search(query, k, params=params)
        keep = found[0] >= 0
        return scores[0][keep], found[0][keep]
    if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
        scores = index.reconstruct_batch(positions) @ query[0]
        best = np.lexsort((positions, -scores))[:k]
        return scores[best], positions[best]
    return None
