"""#13 item 4: a lost or damaged metadata store (or manifest) is named in one line and rebuilt by `otclip repair`
from what the index keeps: the chunks' records files, replayed in order, and their model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from otclip.engine.search import IndexSearcher
from otclip.indexer.pipeline import index_images, index_texts
from otclip.main import main

ROW_FIELDS = "side, key, sha256, text, label, extra, shard, row, width, height, size, mtime_ns, chunk"


def rows(index: Path) -> list[tuple]:
    """Every item of the store as SQLite holds it (ids aside: a rebuilt store numbers them anew)."""
    with sqlite3.connect(index / "metadata.sqlite") as db:
        return sorted(db.execute(f"SELECT {ROW_FIELDS} FROM items").fetchall(), key=repr)


def answers(index: Path, model) -> list:
    searcher = IndexSearcher(index, model=model)
    try:
        queries = [searcher.search_text("a cat", k=10), searcher.search_texts_for_text("a cat", k=10)]
        return [[(r.path, r.text, r.label, round(r.score, 5)) for r in found] for found in queries]
    finally:
        searcher.close()


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_manifest(path: Path, rows_: list[tuple[Path, str, str]]) -> Path:
    path.write_text("path,caption,label\n" + "".join(f"{p},{c},{lab}\n" for p, c, lab in rows_))
    return path


@pytest.fixture
def history(tmp_path, sample_dir, default_model):
    """An index that went through every kind of change: new files, a removed one, a new caption, a duplicate
    under a new path, new content under an old path, texts added and removed."""
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["chelsea", "rocket", "coffee", "astronaut", "horse"]
    for name in names:
        shutil.copy(sample_dir / f"{name}.jpg", photos / f"{name}.jpg")
    listing = [(photos / f"{n}.jpg", f"a photo of {n}", "first") for n in names]
    index, manifest = tmp_path / "ix", tmp_path / "photos.csv"
    build = dict(model=default_model, progress=False, workers=0, chunk_size=2, query_models=False)
    index_images(write_manifest(manifest, listing), index, **build)
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\na rocket\na cup of coffee\n")
    index_texts(texts, index, default_model, progress=False, query_models=False)

    shutil.copy(photos / "rocket.jpg", photos / "rocket-copy.jpg")  # known content, new path
    shutil.copy(sample_dir / "camera.jpg", photos / "coffee.jpg")  # new content, old path
    listing = [(photos / "chelsea.jpg", "a tabby cat", "second"), *listing[1:4], (photos / "rocket-copy.jpg", "x", "y")]
    summary = index_images(write_manifest(manifest, listing), index, **build)  # horse.jpg is gone
    assert (summary.embedded, summary.duplicates, summary.removed) == (1, 1, 1)
    texts.write_text("a cat\na rocket\na starry sky\n")
    index_texts(texts, index, default_model, progress=False, query_models=False)
    return index


def test_a_lost_store_is_rebuilt_equal_from_the_records(history, default_model, capsys):
    """Before: the store could not be rebuilt (records were deleted once ingested); `reindex` without it once
    deleted every embedding."""
    before, found = rows(history), answers(history, default_model)
    records = history / "embeddings" / "records"
    # the first run's last chunk held horse.jpg only: removed, so its records file and vectors are gone, and
    # the removal is kept while older records files hold it
    holding_horse = [log.name for log in records.glob("*.json") if "horse.jpg" in log.read_text()]
    assert len(holding_horse) == 1 and holding_horse[0].endswith("-removed.json")
    for path in history.glob("metadata.sqlite*"):
        path.unlink()
    code, _, err = cli(capsys, "search", history, "a cat")
    assert code == 2 and "metadata.sqlite: missing" in err and f"otclip repair {history}" in err
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and "metadata.sqlite: missing" in out
    code, out, _ = cli(capsys, "repair", history)
    assert code == 0 and "metadata.sqlite: rebuilt from" in out and "5 images, 3 texts" in out, out
    assert rows(history) == before
    assert answers(history, default_model) == found
    assert cli(capsys, "check", history)[0] == 0


def test_damage_to_the_store_manifest_faiss_and_records_is_named_then_repaired(history, default_model, capsys):
    before, found = rows(history), answers(history, default_model)
    store = history / "metadata.sqlite"
    with sqlite3.connect(store) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    for command in (["info", history], ["search", history, "a cat"], ["reindex", history, "--factory", "Flat"],
                    ["index-texts", history.parent / "texts.txt", "--out", history, "--no-progress"]):
        code, _, err = cli(capsys, *command)
        assert code == 2 and f"{store}: damaged" in err and "otclip repair" in err and len(err.splitlines()) == 1, err
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and f"{store}: damaged" in out
    assert cli(capsys, "repair", history)[0] == 0
    assert rows(history) == before and list(history.glob("metadata.sqlite.damaged-*"))  # the damaged file is kept

    manifest = history / "manifest.json"
    manifest.write_text("{garbage")
    faiss_file = next(history.glob("texts-*.faiss"))
    records = sorted((history / "embeddings" / "records").glob("images-*-r0-*.json"))
    records[0].unlink()
    records[1].write_text(records[1].read_text()[:50])
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and f"{manifest}: unreadable" in out
    assert cli(capsys, "repair", history)[0] == 0  # manifest first: model and dimension from the records
    faiss_file = next(history.glob("texts-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:64])
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and f"{faiss_file}: damaged" in out
    assert cli(capsys, "repair", history)[0] == 0 and cli(capsys, "check", history)[0] == 0
    assert answers(history, default_model) == found
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sides": {"images": {"generation": "2"}}}))
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and f"{manifest}: side entry 'images' damaged" in out
    assert cli(capsys, "repair", history)[0] == 0 and cli(capsys, "check", history)[0] == 0
    assert answers(history, default_model) == found
    identity = IndexSearcher(history).manifest["model"]
    assert identity["name"] == "effnet-minilm" and identity["checksum"] == default_model.identity.checksum

    # the records files were damaged above: repair replaced them by a snapshot that rebuilds the same store
    before = [r[:-1] for r in rows(history)]  # (the chunk column names the new records files)
    store.unlink()
    assert cli(capsys, "repair", history)[0] == 0
    assert [r[:-1] for r in rows(history)] == before


def test_an_index_from_before_records_were_kept_gets_them(history, default_model, capsys):
    """A schema-1 store (no chunk column) is migrated, and the next run writes records files for its rows."""
    shutil.rmtree(history / "embeddings" / "records")
    with sqlite3.connect(history / "metadata.sqlite") as db:
        db.executescript("DROP INDEX items_by_label; DROP INDEX items_by_taken; ALTER TABLE items DROP COLUMN exif_time;"
                         "DROP INDEX items_by_chunk; ALTER TABLE items DROP COLUMN chunk; DROP TABLE removals;"
                         "DROP TABLE retired;"
                         "UPDATE meta SET value='1' WHERE key='schema_version'")  # what schema 1 was
    before = [r[:-1] for r in rows_v1(history)]
    code, out, _ = cli(capsys, "search", history, "a cat", "--json", "--before", "2100-01-01")  # a new column
    assert code == 0 and '"path"' in out  # the searcher migrated the older store first
    summary = index_texts(history.parent / "texts.txt", history, default_model, progress=False, query_models=False)
    assert summary.embedded == 0
    assert len(list((history / "embeddings" / "records").glob("*-kept.json"))) == 2  # one per side
    (history / "metadata.sqlite").unlink()
    assert cli(capsys, "repair", history)[0] == 0
    assert [r[:-1] for r in rows(history)] == before


def rows_v1(index: Path) -> list[tuple]:
    with sqlite3.connect(index / "metadata.sqlite") as db:
        fields = ROW_FIELDS.replace(", chunk", "")
        return sorted((*r, None) for r in db.execute(f"SELECT {fields} FROM items").fetchall())


def test_missing_thumbnails_are_made_again(history, capsys):
    thumbs = sorted((history / "thumbnails").glob("*/*.jpg"))
    first = thumbs[0].read_bytes()
    thumbs[0].unlink()
    thumbs[1].write_bytes(thumbs[1].read_bytes()[:300])
    code, out, _ = cli(capsys, "check", history)
    assert code == 1 and "2 thumbnail(s)" in out
    code, out, _ = cli(capsys, "repair", history)
    assert code == 0 and "2 of 2 missing or cut-short thumbnail(s) made again" in out
    assert thumbs[0].read_bytes()[-2:] == b"\xff\xd9" and len(thumbs[0].read_bytes()) == pytest.approx(len(first), rel=0.5)
    with Image.open(thumbs[1]) as remade:
        remade.load()  # decodes whole


def test_a_store_without_records_to_rebuild_it_from_is_refused(history, capsys):
    """An index from before records were kept, its store lost: nothing to replay, so nothing is touched."""
    shutil.rmtree(history / "embeddings" / "records")
    for path in history.glob("metadata.sqlite*"):
        path.unlink()
    chunks = sorted((history / "embeddings").glob("*.npy"))
    code, _, err = cli(capsys, "repair", history)
    assert code == 2 and "cannot be rebuilt" in err and len(err.strip().splitlines()) == 1
    assert sorted((history / "embeddings").glob("*.npy")) == chunks and not (history / "metadata.sqlite").exists()
