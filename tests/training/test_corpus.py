import json

import pytest

from otclip.engine import fashion_mnist
from otclip.training.corpus import CorpusError, load_corpus
from otclip.training.fashion_corpus import build_fashion_mnist_corpus


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_and_unpaired_rows(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    corpus = load_corpus(write(tmp_path / "c.jsonl", [
        {"image": "a.png", "text": "a thing"}, {"image": "a.png"}, {"text": "words"}, {"text": "more", "label": "x"}]))
    assert (len(corpus.pairs), len(corpus.images), len(corpus.texts)) == (1, 1, 2)
    assert corpus.pairs[0].image == str(tmp_path / "a.png")


def test_validation_lists_the_offending_rows(tmp_path):
    with pytest.raises(CorpusError) as info:
        load_corpus(write(tmp_path / "c.jsonl", [{"image": "missing.png", "text": "x"}, {"image": "", "text": ""},
                                                 {"text": "fine"}]))
    message = str(info.value)
    assert "row 1: image missing.png not found" in message and "row 2: neither image nor text" in message


def test_unknown_columns_and_no_pairs(tmp_path):
    with pytest.raises(CorpusError, match="unknown columns"):
        load_corpus(write(tmp_path / "c.jsonl", [{"text": "x", "caption": "y"}]))
    with pytest.raises(CorpusError, match="no pairs at all"):
        load_corpus(write(tmp_path / "d.jsonl", [{"text": "x"}]))
    (tmp_path / "e.csv").write_text("image,text\n,   \n")
    with pytest.raises(CorpusError, match="row 2"):
        load_corpus(tmp_path / "e.csv")


@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_corpus_holds_unseen_classes_out(tmp_path):
    info = build_fashion_mnist_corpus(tmp_path, 0.1, "sandal,bag", seed=0, train_size=200, val_size=50, test_size=300)
    assert info["pairs"] == 20 and info["unpaired_images"] == info["unpaired_texts"] == 180
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert not {"sandal", "bag"} & {r["label"] for r in train}
    assert {"sandal", "bag"} <= {r["label"] for r in test}
    corpus = load_corpus(tmp_path / "train.jsonl")
    assert len(corpus.pairs) == 20
    with pytest.raises(ValueError, match="unknown classes"):
        build_fashion_mnist_corpus(tmp_path / "x", 0.1, "spaceship")
    with pytest.raises(ValueError, match="--val-size -5: must not be negative"):
        build_fashion_mnist_corpus(tmp_path / "y", 0.1, val_size=-5)
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(not fashion_mnist.available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_corpus_is_reused_only_when_built_with_the_same_parameters(tmp_path):
    def build(**changes) -> dict:
        params = {"pair_fraction": 0.1, "unseen": "bag", "seed": 1, "train_size": 60, "val_size": 10,
                  "test_size": 20, "pool_seed": 0, **changes}
        return build_fashion_mnist_corpus(tmp_path, reuse=True, **params)

    def inode() -> int:
        return (tmp_path / "val.jsonl").stat().st_ino

    first = build()
    assert first["test_size"] == first["test"] == 20 and first["pool_seed"] == 0
    before = inode()
    assert build() == first and inode() == before
    for change in ({"seed": 2}, {"pool_seed": 1}, {"unseen": "sandal"}, {"test_size": 25}, {"open_world": True}):
        assert build(**change) != first and inode() != before, change
        before = inode()
    assert build()["test"] == 20
    (tmp_path / "test.jsonl").unlink()  # a corpus missing a manifest is built again
    assert build() and (tmp_path / "test.jsonl").is_file()
    legacy = json.loads((tmp_path / "corpus.json").read_text())
    del legacy["test_size"]  # recorded by a version that kept no sizes
    (tmp_path / "corpus.json").write_text(json.dumps(legacy))
    before = inode()
    assert build()["test_size"] == 20 and inode() != before


def test_an_index_manifest_reads_as_a_corpus(tmp_path):
    """`path` and `caption` stand for `image` and `text` (an index's manifest; its other columns are metadata), in
    JSONL and Parquet (CSV: test_evaluation); a file that has both spellings keeps the strict check."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [{"path": "a.png", "caption": "a thing", "camera": "X100"}, {"path": "b.png", "caption": "", "camera": ""},
            {"path": "", "caption": "words", "camera": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for manifest in (write(tmp_path / "c.jsonl", rows), tmp_path / "c.parquet"):
        corpus = load_corpus(manifest)
        assert [(r.image, r.text) for r in corpus.pairs] == [(str(tmp_path / "a.png"), "a thing")]
        assert [r.image for r in corpus.images] == [str(tmp_path / "b.png")] and corpus.texts[0].text == "words"
    texts_first = write(tmp_path / "t.jsonl", [{"caption": "words", "camera": "X"}, *rows[:1]])  # path in row 2 only
    assert len(load_corpus(texts_first).pairs) == 1
    with pytest.raises(CorpusError, match="row 2: image https://example.com/c.jpg is a URL, not a file"):
        load_corpus(write(tmp_path / "u.jsonl", [rows[0], {"path": "https://example.com/c.jpg", "caption": "c"}]))
    with pytest.raises(CorpusError, match=r"unknown columns \['path'\]"):
        load_corpus(write(tmp_path / "d.jsonl", [{"image": "a.png", "path": "b.png", "text": "x"}]))


def test_a_corpus_folder_holds_its_manifests_in_any_format(tmp_path):
    """`--corpus FOLDER` found train.jsonl or train.csv only: a folder of train.parquet (or val.parquet beside a
    train.csv) was 'no train.jsonl'. Every manifest format is looked for; two train files are refused (which one?)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from otclip.training.trainer import corpus_paths

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    pq.write_table(pa.Table.from_pylist([{"image": "a.png", "text": "a thing"}]), tmp_path / "train.parquet")
    (tmp_path / "val.csv").write_text("image,text\na.png,a thing\n")
    train, val = corpus_paths(str(tmp_path))
    assert (train.name, val.name) == ("train.parquet", "val.csv") and len(load_corpus(train).pairs) == 1
    (tmp_path / "val.csv").rename(tmp_path / "elsewhere.csv")
    assert corpus_paths(str(tmp_path)) == (tmp_path / "train.parquet", None)
    write(tmp_path / "train.jsonl", [{"image": "a.png", "text": "a thing"}])
    with pytest.raises(ValueError, match="train.jsonl and train.parquet are both in the corpus folder; keep one"):
        corpus_paths(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no train manifest in the corpus folder \(train.csv, train.jsonl, "):
        corpus_paths(str(empty))
    assert corpus_paths(str(tmp_path / "elsewhere.csv")) == (tmp_path / "elsewhere.csv", None)
