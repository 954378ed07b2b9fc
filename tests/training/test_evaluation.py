import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    direct = evaluate(default_model, photo_corpus, progress=False)
    via_index = evaluate(default_model, photo_corpus, index_dir=tmp_path / "ix", progress=False)
    for k in ("R@1", "R@5", "R@10", "mean_rank", "median_rank"):
        assert via_index["text_to_image"][k] == pytest.approx(direct["text_to_image"][k])
    assert via_index["text_to_image"]["not_returned"] == 0
    assert via_index["zero_shot"]["accuracy"] == pytest.approx(direct["zero_shot"]["accuracy"])  # the stored vectors


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


def test_recall_from_ranks_by_hand():
    from otclip.engine.metrics import recall_from_ranks

    r = recall_from_ranks(np.array([1.0, 3.0, np.inf, 12.0]))
    assert (r["R@1"], r["R@5"], r["R@10"]) == (0.25, 0.5, 0.5)
    assert r["mean_rank"] == pytest.approx(16 / 3) and r["median_rank"] == 3.0


def _brute_force_ranks(queries, corpus, relevant):
    """1 + the non-relevant corpus images scoring at least the best relevant one, in float64, one query at a time."""
    ranks = []
    for q, rel in zip(queries.astype(np.float64), relevant):
        scores = corpus.astype(np.float64) @ q
        best = scores[rel].max()
        ranks.append(1 + int(np.sum((scores >= best) & ~rel)))
    return np.array(ranks, float)


def test_ranks_through_an_index_are_exact_past_the_first_depth(tmp_path):
    """Through a Flat index of 2000 images, 300 of them the corpus, each caption's rank is its brute-force rank among
    the corpus images, also where the index orders the relevant image past the first search's depth (a fixed depth
    of 100 gave those the worst rank, about 300)."""
    from synthetic_index import clustered, make_index

    from otclip.engine.search import IndexSearcher
    from otclip.training.evaluation import INDEX_DEPTH, ranks_through_index

    vectors = clustered(2000, seed=3)
    make_index(tmp_path / "ix", vectors, "Flat")
    rng = np.random.default_rng(4)
    corpus = np.sort(rng.choice(2000, 300, replace=False))
    queries = clustered(80, seed=5)
    relevant = np.zeros((80, 300), bool)
    relevant[np.arange(80), rng.integers(0, 300, 80)] = True
    relevant[rng.integers(0, 80, 20), rng.integers(0, 300, 20)] = True  # some captions with two images
    expected = _brute_force_ranks(queries, vectors[corpus], relevant)
    searcher = IndexSearcher(tmp_path / "ix")
    got = ranks_through_index(searcher, queries, [f"/p/{i}.jpg" for i in corpus], relevant)
    np.testing.assert_array_equal(got, expected)
    in_index = [1 + int(np.sum(vectors @ q > max(vectors[corpus[relevant[j]]] @ q))) for j, q in enumerate(queries)]
    assert sum(r > INDEX_DEPTH for r in in_index) >= 10  # the deeper searches were needed


def test_an_image_an_approximate_index_never_returns_is_a_miss(tmp_path):
    """An IVF index probes a few lists: a caption whose only relevant image sits in the opposite cluster is never
    answered with it, at any depth: inf (a miss, out of the mean rank), and the report says how many."""
    from synthetic_index import DIM, clustered, make_index

    from otclip.engine.errors import IndexDirectoryError
    from otclip.engine.search import IndexSearcher
    from otclip.training.evaluation import format_report, ranks_through_index

    east = np.eye(DIM, dtype=np.float32)[0]
    rng = np.random.default_rng(6)
    near = east + 0.05 * rng.normal(size=(30, DIM))
    far = -east + 0.05 * rng.normal(size=(30, DIM))
    vectors = np.concatenate([clustered(2500, seed=7), near, far]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    make_index(tmp_path / "ix", vectors, "IVF64,Flat")
    images = [f"/p/{i}.jpg" for i in range(2500, 2560)]
    relevant = np.zeros((2, 60), bool)
    relevant[0, 3], relevant[1, 45] = True, True  # near east; the far side
    searcher = IndexSearcher(tmp_path / "ix")
    ranks = ranks_through_index(searcher, np.stack([east, east]), images, relevant)
    assert ranks[0] == _brute_force_ranks(east[None], vectors[2500:2560], relevant[:1])[0] and np.isinf(ranks[1])
    np.testing.assert_array_equal(searcher.image_vectors(images[::-1]), vectors[2500:2560][::-1])  # as stored
    with pytest.raises(IndexDirectoryError, match="1 of the images are not in the index"):
        searcher.image_vectors([images[0], "/elsewhere.jpg"])
    report = {"model": {"name": "m"}, "corpus": "c", "counts": {"images": 60, "texts": 2}, "relevance": "pair",
              "text_to_image": {"R@1": 0.0, "R@5": 0.0, "R@10": 0.5, "mean_rank": 7.0, "median_rank": 7.0,
                                "not_returned": 1}}
    assert "1 of 2 texts: the index's search returned none of their images" in format_report(report)


def test_an_unreadable_test_image_is_skipped_and_named(photo_corpus, default_model, tmp_path):
    """A damaged file in a test manifest had refused the whole evaluation; as indexing and training do, it is
    skipped and named, the captions left with no image go with it, and the figures are those of the manifest
    without its row, directly and through an index (whose indexer skipped it too). An image the index lacks that
    reads is still refused: another index."""
    from otclip.indexer.pipeline import index_images

    photos = photo_corpus.parent / "photos"
    broken = tmp_path / "photos" / "broken.jpg"
    shutil.copytree(photos, broken.parent)
    broken.write_bytes((photos / "rocket.jpg").read_bytes()[:300])
    rows = [{**json.loads(line), "image": str(broken.parent / Path(json.loads(line)["image"]).name)}
            for line in photo_corpus.read_text().splitlines()]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_broken = tmp_path / "test.jsonl"
    rows.append({"image": str(broken), "text": "a rocket on the launch pad at night", "label": "broken"})
    with_broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = evaluate(default_model, clean, progress=False)
    index_images(broken.parent, tmp_path / "ix", default_model, progress=False, workers=0, query_models=False)
    for index_dir in (None, tmp_path / "ix"):
        report = evaluate(default_model, with_broken, index_dir=index_dir, progress=False)
        assert [s["path"] for s in report["skipped"]] == [str(broken)] and report["skipped"][0]["reason"]
        assert report["counts"] == expected["counts"] == {"images": len(SAMPLE_PHOTOS), "texts": len(rows) - 1}
        for key in ("R@1", "R@5", "R@10", "mean_rank", "median_rank"):
            assert report["text_to_image"][key] == pytest.approx(expected["text_to_image"][key])
        assert report["zero_shot"] == pytest.approx(expected["zero_shot"])
        assert f"skipped 1 image that cannot be read: {broken} (" in format_report(report)
        if index_dir is None:
            assert report["image_to_text"] == pytest.approx(expected["image_to_text"])
    shutil.copy(photos / "chelsea.jpg", tmp_path / "chelsea-copy.jpg")
    rows.append({"image": str(tmp_path / "chelsea-copy.jpg"), "text": "a cat", "label": "chelsea"})
    with_broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"1 corpus images are not in the index \(first: .*chelsea-copy.jpg\)"):
        evaluate(default_model, with_broken, index_dir=tmp_path / "ix", progress=False)
