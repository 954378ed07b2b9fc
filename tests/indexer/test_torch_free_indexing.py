"""A new index of a model loaded before on this machine, whose image tower export is cached, is built through
ONNX Runtime without importing torch (#14); it must hold what the torch encoder would have written: the same
vectors (within the export's checked tolerance), sizes, EXIF times, display copies and skip reasons."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.gallery import BROKEN, write_odd_images


def _contents(index: Path) -> dict[str, tuple]:
    """path -> (vector, width, height, exif_time, thumbnail bytes), read from the files themselves."""
    with sqlite3.connect(index / "metadata.sqlite") as db:
        rows = db.execute("SELECT key, sha256, shard, row, width, height, exif_time FROM items "
                          "WHERE side = 'images'").fetchall()
    out = {}
    for key, sha, shard, row, width, height, taken in rows:
        vector = np.load(index / "embeddings" / f"{shard}.npy")[row]
        thumbnail = next((index / "thumbnails").rglob(f"{sha}*")).read_bytes()
        out[Path(key).name] = (vector, width, height, taken, thumbnail)
    return out


def _gallery(folder: Path) -> Path:
    write_odd_images(folder)
    (folder / "dangling.jpg").unlink()  # copied galleries must not depend on the link's target
    for i, name in enumerate(("chelsea", "coffee", "rocket", "astronaut")):
        from otclip.engine.sample_photos import sample_photo

        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = f"2019:05:0{i + 1} 10:00:00"
        sample_photo(name).resize((900 + 37 * i, 600)).save(folder / f"dated-{name}.jpg", exif=exif, quality=90)
    return folder


def test_a_model_seen_before_indexes_without_torch_as_torch_would(default_model, tmp_path):
    from otclip.indexer.pipeline import index_images

    photos = _gallery(tmp_path / "photos")
    index_images(photos, tmp_path / "warm-up", default_model, progress=False, workers=0)  # export cached
    # --no-query-export keeps a run on torch, the model loaded although its export is at hand
    torch_run = index_images(photos, tmp_path / "torch", "effnet-minilm", progress=False, workers=0,
                             query_models=False)
    assert torch_run.model_loaded
    script = f"""
import json, sys
from otclip.indexer.pipeline import index_images
s = index_images({str(photos)!r}, {str(tmp_path / 'onnx')!r}, "effnet-minilm", progress=False, batch_size=3,
                 workers=2)
print(json.dumps({{"torch": "torch" in sys.modules, "loaded": s.model_loaded, "embedded": s.embedded,
                  "skipped": s.skipped}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    onnx_run = json.loads(run.stdout.strip().splitlines()[-1])
    assert onnx_run == {"torch": False, "loaded": False, "embedded": torch_run.embedded,
                        "skipped": torch_run.skipped}
    ours, theirs = _contents(tmp_path / "onnx"), _contents(tmp_path / "torch")
    assert sorted(ours) == sorted(theirs) and not BROKEN & set(ours) and len(ours) >= 12
    for name, (vector, *facts) in theirs.items():
        np.testing.assert_allclose(ours[name][0], vector, rtol=0, atol=1e-4, err_msg=name)
        assert ours[name][1:] == tuple(facts), name
    assert sum(taken is not None for _, _, _, taken, _ in theirs.values()) == 4  # the dated ones
    errors = [(tmp_path / side / "errors.jsonl").read_text().splitlines() for side in ("onnx", "torch")]
    assert sorted(errors[0]) == sorted(errors[1]) and len(errors[0]) == len(BROKEN) - 1


def test_no_query_export_and_a_changed_checkpoint_keep_torch(default_model, tmp_path):
    """The ONNX path is taken only for the weights the export was checked against: a checkpoint file rewritten
    with other weights is loaded (the memo is stale) and its index records the new weights."""
    from otclip.engine import load_model, save_checkpoint
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.model_memo import remembered_model
    from otclip.indexer.pipeline import index_images

    photos = _gallery(tmp_path / "photos")
    checkpoint = save_checkpoint(default_model, tmp_path / "model.pt")
    first = index_images(photos, tmp_path / "first", str(checkpoint), progress=False, workers=0)
    assert first.model_loaded and remembered_model(str(checkpoint)) is not None
    second = index_images(photos, tmp_path / "second", str(checkpoint), progress=False, workers=0)
    assert not second.model_loaded  # the memo and the cached export of these weights
    import torch

    other = load_model(str(checkpoint))
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(0.01)
    save_checkpoint(other, checkpoint)
    assert remembered_model(str(checkpoint)) is None
    third = index_images(photos, tmp_path / "third", str(checkpoint), progress=False, workers=0)
    assert third.model_loaded
    assert (IndexDirectory(tmp_path / "third").model_identity().checksum
            != IndexDirectory(tmp_path / "first").model_identity().checksum)


def _text_vectors(index: Path) -> dict[str, tuple]:
    """text -> (vector, label), read from the files themselves."""
    with sqlite3.connect(index / "metadata.sqlite") as db:
        rows = db.execute("SELECT text, label, shard, row FROM items WHERE side = 'texts'").fetchall()
    return {text: (np.load(index / "embeddings" / f"{shard}.npy")[row], label) for text, label, shard, row in rows}


def test_a_caption_corpus_of_a_model_seen_before_is_indexed_without_torch_as_torch_would(default_model, tmp_path):
    """`index-texts` through the cached text export: the vectors the torch model writes, batch after batch
    (long texts truncated as the model's tokenizer does, HTML entities and odd Unicode cleaned alike)."""
    from otclip.indexer.pipeline import index_texts

    rows = [{"text": "a tabby cat on a sofa", "label": "cat"}, {"text": "A ROCKET &amp; its launch pad"},
            {"text": "caf\u00e9 cr\u00e8me in a cup \u2615", "label": "coffee"},
            {"text": "the Ã©tÃ© mojibake of a summer dress"},
            {"text": " ".join(f"word{i}" for i in range(200)), "label": "long"},
            *({"text": f"a photo of item number {i}", "label": "item"} for i in range(12))]
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    index_texts(corpus, tmp_path / "warm-up", default_model, progress=False)  # the text export cached
    torch_run = index_texts(corpus, tmp_path / "torch", "effnet-minilm", progress=False, query_models=False)
    assert torch_run.model_loaded and torch_run.embedded == len(rows)
    script = f"""
import json, sys
from otclip.indexer.pipeline import index_texts
s = index_texts({str(corpus)!r}, {str(tmp_path / 'onnx')!r}, "effnet-minilm", progress=False, batch_size=5)
print(json.dumps({{"torch": "torch" in sys.modules, "loaded": s.model_loaded, "embedded": s.embedded}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"torch": False, "loaded": False, "embedded": len(rows)}
    ours, theirs = _text_vectors(tmp_path / "onnx"), _text_vectors(tmp_path / "torch")
    assert sorted(ours) == sorted(theirs) and len(ours) == len(rows)
    for text, (vector, label) in theirs.items():
        np.testing.assert_allclose(ours[text][0], vector, rtol=0, atol=1e-4, err_msg=text)
        assert ours[text][1] == label


def test_a_models_first_index_on_the_cpu_exports_the_image_tower_first_and_embeds_through_it(default_model, tmp_path,
                                                                                             monkeypatch):
    """No export cached yet (a model's first index): on the CPU the image tower is exported and checked before the
    photos are embedded, and ONNX Runtime embeds them (5x torch's forward for EfficientNet-lite0 here), writing what
    torch would have, within the export's checked tolerance."""
    import pytest

    from otclip.engine import encoding
    from otclip.indexer import pipeline
    from otclip.indexer.pipeline import index_images

    photos = _gallery(tmp_path / "photos")
    torch_run = index_images(photos, tmp_path / "torch", default_model, progress=False, workers=0, query_models=False)
    monkeypatch.setattr(pipeline, "cached_query_model", lambda tower, checksum: None)  # as on a first use
    monkeypatch.setattr(encoding.Encoder, "iter_image_batches", lambda *a, **k: pytest.fail("torch's forward embedded"))
    first = index_images(photos, tmp_path / "first", "effnet-minilm", progress=False, workers=0)
    assert first.model_loaded and first.embedded == torch_run.embedded and not first.torch_queries
    ours, theirs = _contents(tmp_path / "first"), _contents(tmp_path / "torch")
    assert sorted(ours) == sorted(theirs) and len(ours) >= 12
    for name, (vector, *facts) in theirs.items():
        np.testing.assert_allclose(ours[name][0], vector, rtol=0, atol=1e-4, err_msg=name)
        assert ours[name][1:] == tuple(facts), name
