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


PROBE_NPROBE = 8  # lists a probe search scans


def probe_search(index: faiss.Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A cheap look at the neighbourhood of a (1, d) query: an IVF index scans only PROBE_NPROBE lists (about
    a tenth of a full search's cost at 1M vectors), any other index searches as usual. Filtered search uses it
    to guess how many items near the query pass a filter, not to answer."""
    k = min(k, max(1, index.ntotal))
    nprobe = default_nprobe(index)
    if nprobe is None or "Gpu" in type(index).__name__:
        return index.search(query, k)
    return index.search(query, k, params=faiss.SearchParametersIVF(nprobe=min(nprobe, PROBE_NPROBE)))


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


def exact_vectors(index: faiss.Index, positions: np.ndarray) -> np.ndarray | None:
    """The vectors at these positions from the index's own exact copies (Flat, HNSW-Flat), or None when the
    index cannot hand them back cheaply (IVF lists, PQ or scalar-quantised codes, a GPU index)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat)):
        return index.reconstruct_batch(np.ascontiguousarray(positions, dtype=np.int64))
    return None


def best_k(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the k highest scores, best first, ties to the lower position (as FAISS's exact
    search breaks them), in O(n + k log k)."""
    if k <= 0:
        return scores[:0], positions[:0]
    if k < len(scores):
        keep = np.argpartition(-scores, k - 1)[:k]
        keep = np.flatnonzero(scores >= scores[keep].min())  # all tied with the k-th: the lowest positions win
        scores, positions = scores[keep], positions[keep]
    best = np.lexsort((positions, -scores))[:k]
    return scores[best], positions[best]
