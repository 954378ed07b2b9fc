"""One thread budget for every compute library in the process: torch intra-op threads (and ONNX Runtime's,
and FAISS's OpenMP threads) times the model calls that may run at once stays within the cores this
process may use. Oversubscribing two cores (the app's two concurrent calls with two threads each) made
a 50 ms text forward take 330-530 ms next to another busy process (#14)."""

from __future__ import annotations

import os
import sys

from .flag_values import check_at_least


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_applied: int | None = None  # the budget apply_thread_budget set in this process (a command's --threads)


def thread_budget(threads: int | None = None, concurrent_calls: int = 1) -> int:
    """Threads per model call: `threads` when given (the --threads flag), else the process's applied budget
    (or its cores) / concurrent calls."""
    if threads is not None:
        check_at_least("--threads", threads)
        return threads
    return max(1, (_applied or available_cores()) // max(1, concurrent_calls))


def passive_waiting() -> None:
    """Idle OpenMP threads sleep instead of spinning (a spinning pool steals the cores that another call, or
    another process, needs). Read once, when the OpenMP runtime starts: call before importing torch or faiss."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")  # Intel's OpenMP (MKL builds) reads this instead


def apply_thread_budget(threads: int) -> int:
    """Set torch's and FAISS's thread counts to `threads` (ONNX Runtime sessions created later read it
    through `thread_budget()`). Libraries not imported yet read it from OMP_NUM_THREADS when they are (importing torch
    here would cost seconds a command may not need)."""
    global _applied
    _applied = threads
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    if "faiss" in sys.modules:
        import faiss

        faiss.omp_set_num_threads(threads)
    return threads
