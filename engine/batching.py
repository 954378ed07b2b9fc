"""Concurrent queries share one forward pass: a single worker thread runs the model on whatever requests
arrived together. One call on all cores answers a burst faster than several calls splitting the cores
(and never oversubscribes them): the server's model calls go through here."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    """`submit(item)` blocks until `fn(batch)` (items -> (n, ...) array, row i for item i) has run on a batch
    holding the item. The worker takes what is queued, up to `max_batch`; a request that arrives alone is
    run alone at once (no waiting window). Calls of batchers sharing `lock` never overlap."""

    def __init__(self, fn: Callable[[Sequence], np.ndarray], max_batch: int = 16,
                 lock: threading.Lock | None = None, name: str = "model") -> None:
        self.fn, self.max_batch = fn, max_batch
        self.lock = lock or threading.Lock()
        self.queue: queue.Queue[tuple[object, Future]] = queue.Queue()
        self.batches: deque[int] = deque(maxlen=10_000)  # sizes of the latest batches run (tests read them)
        threading.Thread(target=self._work, name=f"otclip-{name}-batcher", daemon=True).start()

    def submit(self, item) -> np.ndarray:
        future: Future = Future()
        self.queue.put((item, future))
        return future.result()

    def _work(self) -> None:
        while True:
            pending = [self.queue.get()]
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            items, futures = zip(*pending)
            try:
                with self.lock:
                    out = self.fn(list(items))
            except Exception as exc:  # every request of the batch gets the error, the worker goes on
                for f in futures:
                    f.set_exception(exc)
                continue
            self.batches.append(len(items))
            for f, row in zip(futures, out):
                f.set_result(row)


def length_batches(lengths: Sequence[int], size: int) -> list[np.ndarray]:
    """Positions 0..n-1 in batches of `size`, shortest first (ties in their order): a batch padded to its
    longest row then pads little. Writing each batch's outputs at its positions puts them back in order."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[start : start + size] for start in range(0, len(order), size)]
