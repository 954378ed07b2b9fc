"""The memo of what a spec loaded as (a new index of it is then created without loading it) is trusted only
while nothing that decides the weights has changed."""

from __future__ import annotations

import json
import os

import pytest

from otclip.engine.model_identity import DEFAULT_MODEL_NAME, ModelIdentity
from otclip.engine.model_memo import remember_model, remembered_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OTCLIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_spec_is_remembered_until_the_builders_change(cache):
    identity = ModelIdentity("ViT-B-32-256", "ab" * 32)
    assert remembered_model("ViT-B-32-256") is None
    remember_model("ViT-B-32-256", identity, 512)
    assert remembered_model("ViT-B-32-256") == (identity, 512)
    assert remembered_model("ViT-B-32") is None
    (memo,) = (cache / "models").iterdir()
    written = json.loads(memo.read_text())
    assert written["versions"]["torch"]  # the installed torch's version is part of the memo
    written["versions"]["open_clip_torch"] = "0.0.1"  # another open_clip seeds other random weights
    memo.write_text(json.dumps(written))
    assert remembered_model("ViT-B-32-256") is None


def test_a_weights_file_is_remembered_by_its_path_size_and_mtime(cache, tmp_path, monkeypatch):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1" * 100)
    identity = ModelIdentity("ViT-B-32@w.bin", "cd" * 32)
    remember_model(f"ViT-B-32:{weights}", identity, 512)
    assert remembered_model(f"ViT-B-32:{weights}") == (identity, 512)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))  # rewritten: same size, new mtime
    assert remembered_model(f"ViT-B-32:{weights}") is None
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"checkpoint")
    from otclip.engine.checksums import sha256_file

    remember_model(str(checkpoint), ModelIdentity("m@model.pt", sha256_file(checkpoint)), 384)
    monkeypatch.chdir(tmp_path)  # a relative path names the same file
    assert remembered_model("model.pt") == (ModelIdentity("m@model.pt", sha256_file(checkpoint)), 384)


def test_the_default_model_is_checked_against_its_packaged_files(cache):
    from otclip.engine.effnet_minilm_config import BridgeConfig, packaged_weights_digest

    remember_model(DEFAULT_MODEL_NAME, ModelIdentity(DEFAULT_MODEL_NAME, "00" * 32), 384)  # other packaged weights
    assert remembered_model(DEFAULT_MODEL_NAME) is None
    digest = packaged_weights_digest(BridgeConfig())
    remember_model(DEFAULT_MODEL_NAME, ModelIdentity(DEFAULT_MODEL_NAME, digest), 384)
    assert remembered_model(DEFAULT_MODEL_NAME) == (ModelIdentity(DEFAULT_MODEL_NAME, digest), 384)
