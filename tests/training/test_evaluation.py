import json
import subprocess
import sys

import pytest

from otclip.engine.sample_photos import SAMPLE_PHOTOS, write_sample_photos
from otclip.training.evaluation import eval_data, evaluate, format_report


@pytest.fixture(scope="module")
def photo_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = write_sample_photos(root / "photos")
    rows = [{"image": str(p), "text": s.caption, "label": s.name} for p, s in zip(paths, SAMPLE_PHOTOS)]
    rows.append({"image": str(paths[1]), "text": "a cat lying down", "label": "chelsea"})  # a second caption
    manifest = root / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_several_captions_per_image_are_all_relevant(photo_corpus):
    data = eval_data(photo_corpus)
    cat = data.images.index(next(p for p in data.images if p.endswith("chelsea.jpg")))
    assert data.relevant[:, cat].sum() == 2 and data.relevant.sum() == len(SAMPLE_PHOTOS) + 1


def test_report_on_the_default_model(photo_corpus, default_model):
    report = evaluate(default_model, photo_corpus, progress=False)
    assert report["text_to_image"]["R@1"] >= 0.7 and report["image_to_text"]["R@1"] >= 0.4
    assert report["text_to_image"]["R@10"] >= report["text_to_image"]["R@5"] >= report["text_to_image"]["R@1"]
    assert report["zero_shot"]["classes"] == len(SAMPLE_PHOTOS)
    assert "nan" not in format_report(report) and "seen" not in format_report(report)  # no split: accuracy alone
    split = evaluate(default_model, photo_corpus, unseen=["chelsea", "coffee"], progress=False)
    assert {"seen", "unseen", "harmonic_mean"} <= set(split["zero_shot"]) and "nan" not in format_report(split)
    every = evaluate(default_model, photo_corpus, unseen=[s.name for s in SAMPLE_PHOTOS], progress=False)
    zs = every["zero_shot"]  # no seen image: seen and the harmonic mean are not measured, not 0
    assert zs["seen"] is None and zs["harmonic_mean"] is None and zs["unseen"] == pytest.approx(zs["accuracy"])
    assert f"| {zs['accuracy']:.3f} | - | {zs['unseen']:.3f} | - |" in format_report(every)


def test_index_path_matches_direct_scores(photo_corpus, default_model, tmp_path):
    from otclip.indexer.pipeline import index_images

    index_images(photo_corpus.parent / "photos", tmp_path / "ix", default_model, progress=False, workers=0)
    direct = evaluate(default_model, photo_corpus, progress=False)["text_to_image"]
    via_index = evaluate(default_model, photo_corpus, index_dir=tmp_path / "ix", progress=False)["text_to_image"]
    for k in ("R@1", "R@5", "R@10"):
        assert via_index[k] == pytest.approx(direct[k])


def test_cli_writes_json_and_markdown(photo_corpus, tmp_path):
    done = subprocess.run([sys.executable, "-m", "otclip", "eval", "--corpus", str(photo_corpus), "--relevance", "label",
                           "--out", str(tmp_path / "r.json"), "--md", str(tmp_path / "r.md"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["relevance"] == "label" and "| text to image |" in (tmp_path / "r.md").read_text()
    assert "| text to image |" in done.stdout
