"""Concurrent queries share one forward pass (MicroBatcher), and model calls never overlap."""

import threading
import time

import numpy as np
import pytest

from otclip.engine.batching import MicroBatcher


def _run_concurrently(batcher, items):
    results = [None] * len(items)

    def one(i):
        results[i] = batcher.submit(items[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    return threads, results


def test_requests_that_wait_share_one_call_and_get_their_own_rows():
    lock = threading.Lock()
    calls = []

    def double(batch):
        calls.append(list(batch))
        return np.array([[x, 2 * x] for x in batch], np.float32)

    batcher = MicroBatcher(double, max_batch=16, lock=lock)
    with lock:  # the model is busy: the first request is taken, the other seven queue behind it
        threads, results = _run_concurrently(batcher, list(range(8)))
        deadline = time.time() + 10
        while batcher.queue.qsize() < 7 and time.time() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert batcher.batches == [1, 7]
    assert sorted(len(c) for c in calls) == [1, 7]
    for i, row in enumerate(results):
        np.testing.assert_array_equal(row, [i, 2 * i])


def test_max_batch_is_respected():
    lock = threading.Lock()
    batcher = MicroBatcher(lambda b: np.array(b, np.float32)[:, None], max_batch=3, lock=lock)
    with lock:
        threads, results = _run_concurrently(batcher, list(range(7)))
        while batcher.queue.qsize() < 6:
            time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert batcher.batches == [1, 3, 3]
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
