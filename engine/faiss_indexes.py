"""FAISS index construction, GPU offload and persistence. Indexes hold L2-normalised vectors and
use inner product, so scores are cosine similarities."""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from .atomic_files import write_atomically

EXACT_LIMIT = 50_000  # below this, exact search is fast enough and needs no training
COMPRESS_LIMIT = 2_000_000  # past this, `auto` stores 1 byte a dimension (SQ8) instead of 4 (re-ranked exactly)
TRAIN_SAMPLE_PER_LIST = 64
ADD_BLOCK = 100_000  # vectors read and added at a time
SQ_BITS = (8, 6, 4)  # bits a dimension of the scalar codes `auto` tries within a budget, before PQ
PQ_SIZES = (96, 64, 48, 32, 24, 16, 8)  # bytes a vector `auto` tries, largest first, when a budget asks for PQ
MAX_DEFAULT_NPROBE = 256  # lists a search scans at most unless told (`default_nprobe`)
LARGE_NLIST = 16_384  # from here lists are found through an HNSW graph over the centroids (`coarse_quantizer`),
# and the centroids are trained in two levels (`_train_in_two_levels`)
HNSW_QUANTIZER_M = 32
ADD_EF_SEARCH = 64  # an HNSW quantizer's candidate list while vectors are assigned to lists (`add_rows`)


def auto_factory(n: int, dim: int, max_bytes: int | None = None) -> str:
    """The factory string `auto` picks for `n` vectors of dimension `dim`: exact below EXACT_LIMIT, then IVF
    with ~4 sqrt(n) lists, full vectors below COMPRESS_LIMIT, then 8-bit scalar codes. With `max_bytes`, the
    most accurate of Flat, IVF-Flat, IVF-SQ8/6/4 and OPQ-IVF-PQ (96 down to 8 bytes a vector, smaller than SQ4's
    code) whose `estimated_bytes` fit; compressed ones are re-ranked exactly from the side's vectors file on disk.
    Scalar codes come before PQ: with 10k clustered 512-d vectors a cluster (1M in 100 clusters, IVF1024; the
    density of search_at_scale.py's 10M), SQ4 re-ranked 10x kept recall@10 0.995 where OPQ128/PQ128 re-ranked
    40x kept 0.953 and OPQ64/PQ64 0.591."""
    ivf = coarse_quantizer(2 ** int(round(math.log2(4 * math.sqrt(max(n, 1))))))
    if max_bytes is None:
        if n < EXACT_LIMIT:
            return "Flat"
        return f"{ivf},Flat" if n < COMPRESS_LIMIT else f"{ivf},SQ8"
    candidates = (["Flat"] if n < EXACT_LIMIT else []) + [f"{ivf},Flat"] + [f"{ivf},SQ{b}" for b in SQ_BITS]
    candidates += [f"OPQ{m},{ivf},PQ{m}" for m in PQ_SIZES if dim % m == 0 and m < dim * min(SQ_BITS) // 8]
    for factory in candidates:
        if estimated_bytes(factory, n, dim) <= max_bytes:
            return factory
    smallest = candidates[-1]
    raise ValueError(f"--max-index-memory {size_text(max_bytes)}: no index of {n} vectors of {dim} dimensions fits; "
                     f"the smallest, {smallest}, takes {size_text(estimated_bytes(smallest, n, dim))}")


def coarse_quantizer(nlist: int) -> str:
    """The IVF part of an `auto` factory. From LARGE_NLIST lists (`auto` reaches it at 8.4M vectors), each
    vector added or query searched finds its lists through an HNSW graph over the centroids instead of
    comparing with all of them (FAISS's guideline for 1M+ vectors, "IVF65536_HNSW32"): at 10M x 512-d on 2
    cores, exact assignment to 16384 lists takes ~98 us a vector (16 min), the graph 69 us (ADD_EF_SEARCH)."""
    return f"IVF{nlist}_HNSW{HNSW_QUANTIZER_M}" if nlist >= LARGE_NLIST else f"IVF{nlist}"


def size_text(size: float) -> str:
    """Bytes for people: 60 kB, 23 MB, 1.5 GB (powers of 1000, as --max-index-memory reads them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def estimated_bytes(factory: str, n: int, dim: int) -> int:
    """RAM an index of n vectors takes: its code size a vector (+ an 8-byte id in IVF lists), the IVF
    centroids (4 d bytes a list), a PQ's codebooks (256 x 4 d bytes) and an OPQ rotation (4 d^2 bytes).
    An HNSW graph over the centroids adds its links: 2M 4-byte neighbours a centroid on the base level, and
    the upper levels' share (M 4-byte neighbours for the 1/M of centroids on each level above: ~4 bytes), plus
    its 4-byte level count and 8-byte offset. Checked against the serialised size of built indexes in tests."""
    index = new_index(factory, dim)
    ivf = _ivf_of(index)
    if ivf is None:
        return n * faiss.downcast_index(index).code_size
    fixed = ivf.nlist * dim * 4
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
    if hnsw is not None:
        m = hnsw.nb_neighbors(1)
        fixed += ivf.nlist * (2 * m * 4 + 4 + 4 + 8)
    if "PQ" in factory:
        fixed += 256 * dim * 4
    if factory.startswith("OPQ"):
        fixed += dim * dim * 4
    return n * (ivf.code_size + 8) + fixed


def rerank_factor(index: faiss.Index) -> int:
    """How many candidates per result a search asks this index for, to re-score them exactly: 1 for an index
    that scores with the vectors themselves (Flat, IVF-Flat, HNSW-Flat), 4 for codes of 6 bits or more a
    dimension (SQ8: recall@10 0.976 -> 1.000 at 1M clustered 384-d vectors; SQ6 1.000 at 4x on a denser set),
    10 for 4 bits or more (SQ4 on that set: 0.935 at 4x, 0.995 at 10x), 40 for smaller codes (PQ64: 0.26 ->
    0.99; 4x gave 0.56), measured with benchmarks/search_bench.py (the denser set: `auto_factory`)."""
    kind = faiss.downcast_index(index)  # a CPU index (a GPU one is judged by its factory: `IndexDirectory`);
    # `index` stays referenced meanwhile: the downcast wrapper does not own the C++ object
    if isinstance(kind, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat)):
        return 1
    ivf = _ivf_of(index)
    code_size = ivf.code_size if ivf is not None else getattr(kind, "code_size", 0)
    bits = 8 * code_size / index.d
    return 4 if bits >= 6 else 10 if bits >= 4 else 40


HNSW_EF_SEARCH = 128


def default_nprobe(index: faiss.Index) -> int | None:
    """Lists a search scans: a sixteenth of them (recall@10 1.000 at 1M clustered vectors, 4096 lists), at most
    MAX_DEFAULT_NPROBE: past 4096 lists a query's neighbours still sit in a few dozen of them while the codes
    scanned grow with the lists' count (at 10M, 1024 lists would be 625k codes a query)."""
    ivf = _ivf_of(index)
    return None if ivf is None else max(8, min(ivf.nlist // 16, MAX_DEFAULT_NPROBE))


def _quantizer_ef(index: faiss.Index, ef: int) -> None:
    """Set an HNSW coarse quantizer's candidate list (no-op for other indexes)."""
    ivf = _ivf_of(index)
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None) if ivf is not None else None
    if hnsw is not None:
        hnsw.efSearch = ef


def configure_search(index: faiss.Index) -> faiss.Index:
    """Search-time parameters that trade a little speed for recall@10 near 0.95: IVF lists probed,
    HNSW's candidate list (FAISS's default efSearch of 16 gives poor recall on 384-512-d data); an HNSW
    coarse quantizer looks at least as wide as the lists it must name."""
    nprobe = default_nprobe(index)
    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
        _quantizer_ef(index, max(HNSW_EF_SEARCH, 2 * nprobe))
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


def build_index(vectors: np.ndarray, factory: str = "auto", seed: int = 0, max_bytes: int | None = None,
                progress: bool = False) -> tuple[faiss.Index, str]:
    """Train (on a sample) and fill an inner-product index; returns the CPU index and the factory used
    (`auto`: `auto_factory`, within `max_bytes` when given). `vectors` may be memory-mapped: it is read a
    training sample, then ADD_BLOCK rows at a time, so RAM holds the index and one block. Training and
    adding run on the GPU when FAISS sees one."""
    index, factory = train_index(vectors, factory, seed, max_bytes)
    return add_rows(index, vectors, progress=progress), factory


def train_index(vectors: np.ndarray, factory: str = "auto", seed: int = 0,
                max_bytes: int | None = None) -> tuple[faiss.Index, str]:
    """The empty CPU index `build_index` fills, trained on a sample of `vectors`, and the factory used."""
    n, dim = vectors.shape
    factory = auto_factory(n, dim, max_bytes) if factory == "auto" else factory
    index = new_index(factory, dim)
    if index.is_trained:
        return index, factory
    ivf = _ivf_of(index)
    needed = ivf.nlist if ivf else 1
    if n < needed:
        raise ValueError(f"factory {factory!r} needs at least {needed} vectors to train; the index has {n}")
    sample_size = min(n, max(10_000, TRAIN_SAMPLE_PER_LIST * (ivf.nlist if ivf else 256)))
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))
    sample = np.ascontiguousarray(vectors[chosen], dtype=np.float32)  # sorted: a mapped file reads forward
    work = _to_gpu(index)
    if ivf is not None and ivf.nlist >= LARGE_NLIST and work is index:
        _train_in_two_levels(index, sample, seed)
        return index, factory
    work.train(sample)
    return _to_cpu(work), factory


def add_rows(index: faiss.Index, vectors: np.ndarray, start: int = 0, stop: int | None = None,
             progress: bool = False) -> faiss.Index:
    """`index` (trained) with rows [start, stop) of `vectors` added ADD_BLOCK at a time (on the GPU when FAISS
    sees one). An IVF index stores each row under its own position (start, start + 1, ...), so shards of
    consecutive rows merge without offsets (`merge_shard_files`); flat codes are positions after what the index
    holds (a shard's are appended in order). An HNSW quantizer looks for each vector's list with ADD_EF_SEARCH
    candidates: with FAISS's default of 16, 16.5% of 10M clustered 512-d vectors went to another list than their
    nearest centroid's (1.6% at 64, 0.3% at 128), and a search probing the right lists missed them (recall@10
    0.886 at nprobe 256)."""
    stop = len(vectors) if stop is None else stop
    _quantizer_ef(index, ADD_EF_SEARCH)
    with_ids = _lists_at_top(index) is not None
    work = _to_gpu(index)
    blocks = range(start, stop, ADD_BLOCK)
    for first in tqdm(blocks, desc="adding", unit="block", disable=not progress or len(blocks) < 5):
        last = min(first + ADD_BLOCK, stop)
        block = np.ascontiguousarray(vectors[first:last], dtype=np.float32)
        if with_ids:
            work.add_with_ids(block, np.arange(first, last, dtype=np.int64))
        else:
            work.add(block)
    return configure_search(_to_cpu(work))


def _lists_at_top(index: faiss.Index):
    """The IVF index whose inverted lists are the whole of `index`'s data (itself, or behind a pre-transform such
    as OPQ), or None: a refine wrapper keeps vectors of its own, an IVFPQR re-ranking codes, neither in lists."""
    kind = faiss.downcast_index(index)
    if isinstance(kind, faiss.IndexPreTransform):
        kind = faiss.downcast_index(kind.index)
    return kind if isinstance(kind, faiss.IndexIVF) and not isinstance(kind, faiss.IndexIVFPQR) else None


def mergeable(index: faiss.Index) -> bool:
    """Whether shards of this index merge (`merge_shard_files`): plain inverted lists and flat codes do; an HNSW
    graph does not (its shards would have to be built again as one), nor an index that keeps data beside its
    lists, nor fast-scan's packed blocks."""
    kind, ivf = faiss.downcast_index(index), _lists_at_top(index)
    if ivf is not None:
        return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)
    return isinstance(kind, faiss.IndexFlatCodes) and kind.is_trained


def list_entry_bytes(index: faiss.Index) -> int | None:
    """The bytes each added vector takes in an index's inverted lists (its code and its 8-byte id) when those lists
    hold all its data and merge on disk (`merge_shard_files`); None otherwise (flat codes, HNSW, refine)."""
    ivf = _lists_at_top(index)
    return ivf.code_size + 8 if ivf is not None and mergeable(index) else None


def merge_shard_files(trained: faiss.Index, shards: list[Path], lists_path: Path) -> faiss.Index:
    """One index from shard files holding consecutive rows in order (`add_rows` into copies of `trained`, empty).

    Inverted lists are merged on disk, as FAISS's `contrib.ondisk.merge_ondisk` does: the shards are read
    memory-mapped (IO_FLAG_MMAP) and their lists copied, list by list, into `lists_path`, an OnDiskInvertedLists
    file that the returned index reads memory-mapped; neither the shards nor the merged lists need RAM. Each list
    holds its entries in shard order, the order one process adds them in. (FAISS's helper disowns the shards'
    lists, keeping every shard mapped until the process exits; here they are released after the merge.)
    Flat codes are appended in memory, a shard at a time: the merged index is their concatenation."""
    ivf = _lists_at_top(trained)
    if ivf is None:  # the first shard, then the others appended (as read from files: FAISS merges only one type)
        merged = load_index(shards[0], use_gpu=False)
        for path in shards[1:]:
            merged.merge_from(load_index(path, use_gpu=False), 0)
        return configure_search(merged)
    if trained.ntotal:
        raise ValueError(f"merging shards into an index that holds {trained.ntotal} vectors: it must be empty")
    parts = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in shards]  # referenced until merged
    sources = faiss.InvertedListsPtrVector()
    for part in parts:
        sources.push_back(faiss.extract_index_ivf(part).invlists)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
    with _quiet_stdout():  # FAISS prints "resizing FILE to N bytes"
        total = lists.merge_from_multiple(sources.data(), sources.size(), False)
    del sources, parts
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    trained.ntotal = ivf.ntotal = total
    return configure_search(trained)


_STDOUT = threading.Lock()  # one redirection at a time: two interleaved would leave standard output closed


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Standard output closed at the file-descriptor level: FAISS's on-disk lists `printf` on every resize and
    every relocated open, which would land in the middle of `otclip search --json`'s output."""
    with _STDOUT:
        sys.stdout.flush()
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)  # C's buffered stdout goes to /dev/null, not to the restored descriptor
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)


def _train_in_two_levels(index: faiss.Index, sample: np.ndarray, seed: int) -> None:
    """Train an IVF index of LARGE_NLIST+ lists with FAISS's two-level clustering: k-means into sqrt(nlist)
    groups, then each group into lists in proportion to its size. Flat k-means costs n x nlist x d a
    iteration (1M x 16384 x 512: 37 min for 25 iterations on 2 cores); two levels ~2 sqrt(nlist) / nlist of
    that (15 s for 640k x 512-d into 16384 lists). Spherical (unit centroids): scores are inner products of
    unit vectors. Pre-transforms (OPQ) train first and the centroids live in their output space, as in
    FAISS's `train_ivf_index_with_2level`; the codes (PQ, SQ) then train on the sample's residuals."""
    from faiss.contrib.clustering import two_level_clustering

    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            transform.train(sample)
            sample = transform.apply(sample)
    ivf = faiss.extract_index_ivf(index)
    centroids, _ = two_level_clustering(sample, int(math.sqrt(ivf.nlist)), ivf.nlist, spherical=True, seed=seed,
                                        min_points_per_centroid=1)  # a small group is no reason to warn
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf.train(sample)  # its quantizer is full: only the codes train
    index.is_trained = True


def save_index(index: faiss.Index, path: str | Path) -> Path:
    return write_atomically(path, lambda tmp: faiss.write_index(index, tmp))


def load_index(path: str | Path, use_gpu: bool = True, mmap: bool = False) -> faiss.Index:
    """Read an index; `mmap`: its vectors or codes stay in the file, memory-mapped (FAISS's IO_FLAG_MMAP_IFC:
    opening a GB-sized index takes milliseconds, and pages come in as queries touch them). An index whose lists
    live in a file of their own (`merge_shard_files`: the index's name with .ivfdata) reads them memory-mapped
    and read-only from beside it, wherever the folder was moved or copied to (never from the path written at
    build time), once their size was checked. A GPU copy is made from RAM, never mapped."""
    path = Path(path)
    beside = path.with_suffix(".ivfdata")
    if beside.exists():
        with _quiet_stdout():  # FAISS prints "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..."
            index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
    else:
        mapped = mmap and not (use_gpu and gpu_count())
        index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP_IFC if mapped else 0))
    lists = on_disk_lists(index)
    if lists is not None and Path(lists.filename) != beside:
        raise ValueError(f"{beside}: missing (the index's lists)")
    if lists is not None and beside.stat().st_size < lists.totsize:  # read past its end, the process would crash
        raise ValueError(f"{beside}: cut short ({beside.stat().st_size} of {lists.totsize} bytes)")
    if lists is not None:  # FAISS's default starts 32 threads a search to read the lists ahead: 0.6 ms a query
        lists.prefetch_nthread = 0  # (0.81 -> 0.21 ms at 200k x 128-d, warm); the kernel reads ahead of the faults
    index = configure_search(index)
    return _to_gpu(index) if use_gpu else index


def on_disk_lists(index: faiss.Index):
    """The index's OnDiskInvertedLists (`.filename`, `.totsize`), or None when its lists live in the index."""
    ivf = _ivf_of(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def index_description(index: faiss.Index) -> str:
    return type(_to_cpu(index)).__name__


def exact_vectors(index: faiss.Index, positions: np.ndarray) -> np.ndarray | None:
    """The vectors at these positions from the index's own exact copies (Flat, HNSW-Flat), or None when the
    index cannot hand them back cheaply (IVF lists, PQ or scalar-quantised codes, a GPU index)."""
    if isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexHNSWFlat)):
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
