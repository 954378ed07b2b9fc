"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


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

