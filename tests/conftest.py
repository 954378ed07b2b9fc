"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the suite's servers record themselves (and caches live) here, not in the user's ~/.cache/otclip. Once per
# process: a test's `from conftest import ...` may execute this file again (--import-mode=importlib), which
# must not move the cache from under servers and models already using it.
if os.environ.get("OTCLIP_TEST_PROCESS") != str(os.getpid()):
    os.environ["OTCLIP_TEST_PROCESS"] = str(os.getpid())
    os.environ["OTCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="otclip-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OTCLIP_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def default_model():
    from otclip.engine import load_model

    return load_model("effnet-minilm", device="cpu")


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
