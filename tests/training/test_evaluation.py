import json
import subprocess
import sys
from pathlib import Path

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


def test_one_manifest_serves_the_index_and_the_evaluation(photo_corpus, default_model, tmp_path, monkeypatch):
    """A user's captioned collection (`path`, `caption`, metadata columns), given by a relative path, indexes and
    evaluates alike: `eval` had refused its columns, and found none of a relative corpus's images in the index
    (it compared relative paths with the index's absolute ones). And a corpus (`image`, `text`) indexes with its
    captions."""
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images

    root = photo_corpus.parent
    rows = [json.loads(line) for line in photo_corpus.read_text().splitlines()]
    with open(root / "collection.csv", "w", newline="") as f:
        f.write("path,caption,label,camera\n")
        f.writelines(f"photos/{Path(r['image']).name},{r['text']},{r['label']},X100\n" for r in rows)
    monkeypatch.chdir(root)
    index_images("collection.csv", tmp_path / "ix", default_model, progress=False, workers=0, query_models=False)
    direct = evaluate(default_model, photo_corpus, progress=False)
    via_index = evaluate(default_model, "collection.csv", index_dir=tmp_path / "ix", progress=False)
    assert via_index["counts"] == direct["counts"] == {"images": len(SAMPLE_PHOTOS), "texts": len(rows)}
    for k in ("R@1", "R@5", "R@10"):
        assert via_index["text_to_image"][k] == pytest.approx(direct["text_to_image"][k])

    index_images(photo_corpus, tmp_path / "ix2", default_model, progress=False, workers=0, query_models=False)
    best = IndexSearcher(tmp_path / "ix2", model=default_model).search("a cat", "images", 1).results[0]
    assert (Path(best.path).name, best.text, best.label) == ("chelsea.jpg", "a cat lying down", "chelsea")


def test_eval_through_an_index_uses_the_index_model(photo_corpus, default_model, tmp_path, capsys):
    """`otclip eval --index DIR` without --model evaluates the index's own model (it loaded the default and was
    refused by an index of a fine-tuned checkpoint)."""
    from otclip.engine import save_checkpoint
    from otclip.indexer.pipeline import index_images
    from otclip.main import main

    checkpoint = save_checkpoint(default_model, tmp_path / "tuned.pt", name="tuned")
    index_images(photo_corpus, tmp_path / "ix", str(checkpoint), progress=False, workers=0, query_models=False)
    assert main(["eval", "--corpus", str(photo_corpus), "--index", str(tmp_path / "ix"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"model tuned@tuned.pt on {photo_corpus}")
