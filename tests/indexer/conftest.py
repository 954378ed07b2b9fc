import shutil

import pytest

from otclip.engine.sample_photos import write_sample_photos


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    return write_sample_photos(tmp_path_factory.mktemp("sample"))[0].parent


@pytest.fixture
def gallery(tmp_path, sample_dir):
    """A fresh copy of the sample photos that a test may change."""
    dest = tmp_path / "gallery"
    shutil.copytree(sample_dir, dest)
    return dest
