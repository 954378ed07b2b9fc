import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


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
