"""The frozen-feature cache is shared by processes (torchrun ranks, the experiment's runs side by side): a
side is read, completed and written under one lock, so a process that arrives while another completes it
waits and then finds the features computed."""

from __future__ import annotations

import threading

import torch
from filelock import FileLock

from otclip.training.feature_cache import FeatureCache
from otclip.training.trainable import TrainableModel


def test_a_process_completing_a_side_holds_its_lock_and_the_waiting_one_gets_true_features(default_model, tmp_path):
    trainable = TrainableModel(default_model)
    cache = FeatureCache(trainable, cache_dir=tmp_path, progress=False)
    texts = ["a tabby cat", "a rocket on the launch pad", "a cup of coffee"]
    with torch.no_grad():
        expected = trainable.text_features(default_model.tokenizer(texts)).numpy()
    got: list = []
    worker = threading.Thread(target=lambda: got.append(cache.texts(texts)))
    folder = tmp_path / trainable.feature_key("texts")
    folder.mkdir(parents=True)
    with FileLock(folder / "texts.lock"):  # another process completing the side
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and not got  # it waits ...
    worker.join(60)
    assert len(got) == 1  # ... then reads or computes, and every text gets its own features
    torch.testing.assert_close(got[0], torch.from_numpy(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.texts(texts[::-1]), torch.from_numpy(expected[::-1].copy()), rtol=0, atol=1e-5)


def test_a_killed_writers_half_written_features_are_removed(default_model, tmp_path):
    """A process killed while writing a side's next generation leaves `.texts-N.npy.tmpPID`; the next process to hold
    the side's lock removes it (its writer is gone), and keeps a live writer's."""
    import os
    import subprocess
    import sys

    trainable = TrainableModel(default_model)
    cache = FeatureCache(trainable, cache_dir=tmp_path, progress=False)
    folder = tmp_path / trainable.feature_key("texts")
    folder.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = folder / f".texts-1.npy.tmp{int(gone.stdout)}", folder / f".texts-7.npy.tmp{os.getpid()}"
    dead.write_bytes(b"\x93NUMPY cut short")
    live.write_bytes(b"\x93NUMPY being written")
    cache.texts(["a tabby cat"])
    assert not dead.exists() and live.exists()
