"""A server over indexes that keep both exported towers never loads the torch model (#14): its collections
answer text and image queries through ONNX Runtime, those of one model sharing the same sessions."""

import json
import subprocess
import sys

import numpy as np


def test_collections_answer_without_torch(demo_index, default_model, tmp_path):
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    photos = sorted((demo_index / "data" / "photos").glob("*.jpg"))[:3]
    (tmp_path / "few").mkdir()
    for photo in photos:
        (tmp_path / "few" / photo.name).write_bytes(photo.read_bytes())
    index_images(tmp_path / "few", tmp_path / "second", default_model, progress=False, workers=0)
    rocket = demo_index / "data" / "photos" / "rocket.jpg"
    script = f"""
import json, sys
from otclip.app.server import open_collections
from otclip.app.search_app import SearchApp
from otclip.engine.query_language import Term
first, second = open_collections([{str(demo_index / 'index')!r}, {str(tmp_path / 'second')!r}])
app = SearchApp(first)
pages = [app.search([Term("text", "a rocket")], k=3), app.search([Term("image", {str(rocket)!r})], k=3)]
print(json.dumps({{"pages": [[[r.path, r.score] for r in p.results] for p in pages],
                  "shared": second._image_model is first._image_model and second._text_model is first._text_model,
                  "torch": "torch" in sys.modules}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                    check=True).stdout.strip().splitlines()[-1])
    assert out["torch"] is False and out["shared"] is True
    reference = IndexSearcher(demo_index / "index", model=default_model)
    for got, want in zip(out["pages"], [reference.search_text("a rocket", k=3), reference.search_image(str(rocket), k=3)]):
        assert [p for p, _ in got] == [r.path for r in want]
        np.testing.assert_allclose([s for _, s in got], [r.score for r in want], atol=1e-4)
