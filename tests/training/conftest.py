import pytest

from otclip.engine import fashion_mnist


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A small real partially-paired corpus (Fashion-MNIST), shared by the training tests."""
    if not fashion_mnist.available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from otclip.training.fashion_corpus import build_fashion_mnist_corpus

    root = tmp_path_factory.mktemp("fm-corpus")
    build_fashion_mnist_corpus(root, 0.1, "sandal,bag", seed=0, train_size=300, val_size=100, test_size=100)
    return root
