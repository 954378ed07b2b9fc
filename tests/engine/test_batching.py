"""Concurrent queries share one forward pass (MicroBatcher), and model calls never overlap."""

import threading
import time

import numpy as np
import pytest

from otclip.engine.batching import MicroBatcher


def _wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


class _ModelLock:
    """A lock that tells when the worker has asked for it (it then holds its batch, waiting for the model)."""

    def __init__(self) -> None:
        self.inner, self.asked = threading.Lock(), threading.Event()

    def __enter__(self):
        self.asked.set()
        self.inner.acquire()

    def __exit__(self, *exc):
        self.inner.release()


def _while_busy(batcher, lock: _ModelLock, items):
    """Submit items[0], wait until the worker holds it (blocked on the busy model), then submit the rest
    and wait until they are all queued; the model is free again on return."""
    results = [None] * len(items)

    def one(i):
        results[i] = batcher.submit(items[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    with lock.inner:  # the model is busy
        threads[0].start()
        assert lock.asked.wait(10)  # the worker took the first request and waits for the model
        for t in threads[1:]:
            t.start()
        _wait_for(lambda: batcher.queue.qsize() == len(items) - 1)
    for t in threads:
        t.join(10)
    return results


def test_requests_that_wait_share_one_call_and_get_their_own_rows():
    lock = _ModelLock()
    calls = []

    def double(batch):
        calls.append(list(batch))
        return np.array([[x, 2 * x] for x in batch], np.float32)

    batcher = MicroBatcher(double, max_batch=16, lock=lock)
    results = _while_busy(batcher, lock, list(range(8)))  # the other seven queue behind the first
    assert list(batcher.batches) == [1, 7]
    assert sorted(len(c) for c in calls) == [1, 7]
    for i, row in enumerate(results):
        np.testing.assert_array_equal(row, [i, 2 * i])


def test_max_batch_is_respected():
    lock = _ModelLock()
    batcher = MicroBatcher(lambda b: np.array(b, np.float32)[:, None], max_batch=3, lock=lock)
    results = _while_busy(batcher, lock, list(range(7)))
    assert list(batcher.batches) == [1, 3, 3]
    assert [float(r[0]) for r in results] == list(range(7))


def test_a_failing_call_fails_its_requests_and_the_worker_goes_on():
    def picky(batch):
        if "bad" in batch:
            raise ValueError("bad input")
        return np.ones((len(batch), 1), np.float32)

    batcher = MicroBatcher(picky)
    with pytest.raises(ValueError, match="bad input"):
        batcher.submit("bad")
    assert batcher.submit("good")[0] == 1.0


def test_two_batchers_sharing_a_lock_never_overlap():
    lock = threading.Lock()
    active, overlaps = [0], []

    def slow(batch):
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.02)
        active[0] -= 1
        return np.zeros((len(batch), 1), np.float32)

    a, b = MicroBatcher(slow, lock=lock), MicroBatcher(slow, lock=lock)
    threads = [threading.Thread(target=(a if i % 2 else b).submit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert max(overlaps) == 1
