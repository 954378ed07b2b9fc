"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

import pytest

# under pytest-xdist (`make test` runs two workers), each worker computes on one core: two workers with two torch
# threads each on a 2-core machine made compute-bound tests 4-6x slower; idle OpenMP threads sleep rather than spin
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY, which the OpenMP runtime reads when it starts)

THREADS = max(1, 2 // WORKERS)
torch.set_num_threads(THREADS)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the suite's servers record themselves (and caches live) here, not in the user's ~/.cache/otclip. Once per
# process: a test's `from conftest import ...` may execute this file again (--import-mode=importlib), which
# must not move the cache from under servers and models already using it.
if os.environ.get("OTCLIP_TEST_PROCESS") != str(os.getpid()):
    os.environ["OTCLIP_TEST_PROCESS"] = str(os.getpid())
    os.environ["OTCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="otclip-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OTCLIP_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _threads_as_the_suite_set_them():
    """A command run in process (`main([...])`) applies its thread budget (the machine's cores) to torch; the next
    test runs on the suite's count again."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def default_model():
    """Shared by every test of a process (under xdist, of a worker, which runs the files in another order): a test
    that trains or changes it must take a copy, else the tests after it compare against other weights."""
    from otclip.engine import load_model
    from otclip.engine.checksums import state_dict_sha256

    loaded = load_model("effnet-minilm", device="cpu")
    digest = state_dict_sha256(loaded.model)
    yield loaded
    assert state_dict_sha256(loaded.model) == digest, "a test changed the shared default model's weights"


@pytest.fixture(scope="session")
def encoder(default_model):
    from otclip.engine import Encoder

    return Encoder(default_model, batch_size=32, num_workers=1)


def needs_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, default_model):
    from otclip.app.demo import build_demo_index

    root = tmp_path_factory.mktemp("demo")
    build_demo_index(root / "index", root / "data", fashion_mnist_count=0, progress=False)
    return root


@pytest.fixture(scope="session")
def live_app(demo_index, default_model):
    """A real Gradio server on loopback over the sample index; yields its URL."""
    from otclip.app.server import serve
    from otclip.engine.search import IndexSearcher

    port = free_port()
    ui = serve(demo_index / "index", "127.0.0.1", port, block=False,
               searcher=IndexSearcher(demo_index / "index", model=default_model))
    yield f"http://127.0.0.1:{port}/"
    ui.close()
