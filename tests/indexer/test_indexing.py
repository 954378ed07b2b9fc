import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from otclip.engine.errors import IndexDirectoryError
from otclip.engine.index_directory import IndexDirectory
from otclip.engine.search import IndexSearcher
from otclip.indexer.pipeline import index_images, index_texts, reindex
from otclip.main import main

from gallery import BROKEN, write_odd_images


def build(gallery, out, default_model, **kw):
    return index_images(gallery, out, default_model, progress=False, workers=1, **kw)


def paths_in(out):
    d = IndexDirectory(out)
    keys = sorted(d.store.stats("images"))
    d.close()
    return keys


def test_index_then_search_finds_the_cat(gallery, tmp_path, default_model):
    out = tmp_path / "ix"
    s = build(gallery, out, default_model)
    assert (s.embedded, s.total, s.skipped) == (20, 20, 0)
    assert (out / "metadata.sqlite").exists() and list(out.glob("images-*.faiss"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["checksum"] == default_model.identity.checksum
    searcher = IndexSearcher(out, model=default_model)
    top = searcher.search_text("a cat", k=3)
    assert top[0].path.endswith("chelsea.jpg") and top[0].rank == 1 and top[0].width == 451
    assert [r.score for r in top] == sorted([r.score for r in top], reverse=True)
    assert searcher.search_image(gallery / "coffee.jpg", k=1)[0].path.endswith("coffee.jpg")
    assert searcher.search_text("a cat", k=20, min_score=0.3)[0].path.endswith("chelsea.jpg")
    assert all(r.score >= 0.3 for r in searcher.search_text("a cat", k=20, min_score=0.3))


def test_exact_index_equals_brute_force(gallery, tmp_path, default_model, encoder):
    out = tmp_path / "ix"
    build(gallery, out, default_model)
    searcher = IndexSearcher(out, model=default_model)
    paths = sorted(str(p) for p in gallery.iterdir())
    emb = encoder.encode_images(paths)
    for query in ["a rocket", "galaxies", "a brick wall"]:
        q = encoder.encode_text(query)
        expected = [paths[i] for i in np.argsort(-(emb @ q))[:5]]
        assert [r.path for r in searcher.search_text(query, k=5)] == expected


def test_incremental_add_change_delete_duplicate(gallery, tmp_path, default_model):
    out = tmp_path / "ix"
    build(gallery, out, default_model)
    shutil.copy(gallery / "coffee.jpg", gallery / "coffee-copy.jpg")  # duplicate content
    (gallery / "moon.jpg").unlink()  # deleted
    from PIL import Image
    Image.open(gallery / "rocket.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(gallery / "horse.jpg")  # changed
    os.utime(gallery / "grass.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
    s = build(gallery, out, default_model)
    assert s.embedded == 1  # only the changed horse.jpg
    assert s.duplicates == 1 and s.removed == 1 and s.total == 20
    assert not any(p.endswith("moon.jpg") for p in paths_in(out))
    searcher = IndexSearcher(out, model=default_model)
    hit = searcher.search_image(gallery / "coffee.jpg", k=2)
    assert hit[0].score == pytest.approx(1.0, abs=1e-4)
    assert any(d.endswith("coffee-copy.jpg") for d in hit[0].duplicates) or hit[0].path.endswith("coffee-copy.jpg")
    assert hit[1].score < 0.99  # the duplicate is one vector, not two
    again = build(gallery, out, default_model)
    assert again.embedded == 0 and again.unchanged == 20


def test_broken_and_awkward_files(tmp_path, default_model):
    odd = tmp_path / "odd"
    write_odd_images(odd)
    (odd / "loop").symlink_to(odd)  # a symlink loop
    s = build(odd, tmp_path / "ix", default_model)
    errors = [json.loads(line) for line in (tmp_path / "ix" / "errors.jsonl").read_text().splitlines()]
    assert {os.path.basename(e["path"]) for e in errors} == BROKEN
    assert all(e["reason"] for e in errors)
    indexed = {os.path.basename(p) for p in paths_in(tmp_path / "ix")}
    assert "non-ascii-é猫.webp" in indexed and "cmyk.JPG" in indexed and "rotated.jpg" in indexed
    assert s.skipped == len(BROKEN) and s.total == len(indexed) == 9


def test_model_mismatch_is_refused(gallery, tmp_path, default_model):
    from otclip.engine import load_model

    out = tmp_path / "ix"
    build(gallery, out, default_model)
    other = load_model("RN50", device="cpu")
    with pytest.raises(IndexDirectoryError, match=r"built with model effnet-minilm.*refusing model RN50"):
        IndexSearcher(out, model=other)
    with pytest.raises(IndexDirectoryError, match="refusing"):
        index_images(gallery, out, other, progress=False)


def test_text_side_and_reindex(gallery, tmp_path, default_model):
    from otclip.engine.sample_photos import SAMPLE_PHOTOS

    out = tmp_path / "ix"
    build(gallery, out, default_model)
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(p.caption for p in SAMPLE_PHOTOS) + "\na tabby cat\n")
    s = index_texts(corpus, out, default_model, progress=False)
    assert s.total == len(SAMPLE_PHOTOS) and s.duplicates == 1
    searcher = IndexSearcher(out, model=default_model)
    assert searcher.search_texts_for_image(gallery / "chelsea.jpg", k=1)[0].text == "a tabby cat"
    rebuilt = reindex(out, "HNSW32")
    assert {r["factory"] for r in rebuilt} == {"HNSW32"}
    searcher = IndexSearcher(out, model=default_model)
    assert searcher.info()["sides"]["images"]["index_type"] == "IndexHNSWFlat"
    assert searcher.search_text("a cat", k=1)[0].path.endswith("chelsea.jpg")


def test_manifest_with_captions(tmp_path, sample_dir, default_model):
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": str(sample_dir / "chelsea.jpg"), "caption": "an old caption", "owner": "bob"},
            {"path": str(sample_dir / "chelsea.jpg"), "caption": "my cat", "label": "pet", "owner": "ann"},
            {"path": str(sample_dir / "rocket.jpg"), "caption": "launch"}]  # a path on two rows: the last is kept
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    build(manifest, tmp_path / "ix", default_model)
    results = IndexSearcher(tmp_path / "ix", model=default_model).search_text("a cat", k=5)
    assert len(results) == 2 and (results[0].text, results[0].label, results[0].extra) == ("my cat", "pet", {"owner": "ann"})


def _run_index(gallery, out, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "otclip", "index", str(gallery), "--out", str(out), "--chunk-size", "4",
         "--batch-size", "4", "--workers", "0", "--no-progress"],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_kill_and_resume(tmp_path, sample_dir):
    gallery = tmp_path / "big"
    gallery.mkdir()
    for i in range(3):  # 60 files: distinct content so nothing is de-duplicated
        for p in sample_dir.iterdir():
            from PIL import Image
            Image.open(p).rotate(90 * i + 1).save(gallery / f"{i}-{p.name}")
    out = tmp_path / "ix"
    proc = _run_index(gallery, out)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some chunks were committed
        if len(list((out / "embeddings").glob("*.npy"))) >= 3 if (out / "embeddings").exists() else False:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    committed = len(paths_in(out))
    assert 0 < committed < 60
    proc = _run_index(gallery, out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    keys = paths_in(out)
    assert len(keys) == len(set(keys)) == 60
    assert "60 indexed" in output and f"{60 - committed} embedded" in output


def list_contents(index):
    """An IVF index's lists, list by list: (ids, codes)."""
    from faiss.contrib.inspect_tools import get_invlist

    ivf = faiss.extract_index_ivf(index)
    return [tuple(part.tobytes() for part in get_invlist(ivf.invlists, i)) for i in range(ivf.nlist)]


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "otclip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_process_gloo_equals_single_process(gallery, tmp_path, default_model, capsys):
    """Under torchrun each rank embeds a share of the images, then adds its share of the rows to the trained index
    and writes it as a shard; rank 0 merges the shards' lists on disk (.ivfdata): list by list what one process
    builds from the same vectors. `otclip reindex` under torchrun does the same; a lists file cut short is named
    by `otclip check` and rebuilt by `otclip repair`."""
    single = tmp_path / "single"
    build(gallery, single, default_model)
    sharded = tmp_path / "sharded"
    torchrun("index", str(gallery), "--out", str(sharded), "--workers", "0", "--no-progress", "--factory", "IVF4,Flat")
    a, b = IndexDirectory(single), IndexDirectory(sharded)
    ids_a, vec_a = a.unique_embeddings("images")
    ids_b, vec_b = b.unique_embeddings("images")
    keys_a, keys_b = a.store.items(ids_a.tolist()), b.store.items(ids_b.tolist())
    order_a = np.argsort([keys_a[i]["key"] for i in ids_a])
    order_b = np.argsort([keys_b[i]["key"] for i in ids_b])
    assert [keys_a[i]["key"] for i in ids_a[order_a]] == [keys_b[i]["key"] for i in ids_b[order_b]]
    np.testing.assert_allclose(vec_a[order_a], vec_b[order_b], atol=1e-5)
    shards = {row["shard"].split("-r")[1][:1] for row in b.store.stats("images").values()}
    assert shards == {"0", "1"}  # both ranks embedded a share

    entry = b.manifest()["sides"]["images"]
    assert entry["ranks"] == 2 and entry["factory"] == "IVF4,Flat" and entry["lists_on_disk"]
    assert b.side_file("images", ".ivfdata").exists()
    assert entry["index_bytes"] == b.index_bytes("images") > b.side_file("images", ".ivfdata").stat().st_size
    assert not list(sharded.glob("*.shard-*")) and not list(sharded.glob("*.trained.faiss"))  # merged, removed
    assert main(["info", str(sharded)]) == 0
    assert "added by 2 torchrun ranks and merged on disk" in capsys.readouterr().out
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(sharded, rebuilt)
    assert reindex(rebuilt, "IVF4,Flat")[0]["ranks"] == 1  # one process, the same stored vectors
    c = IndexDirectory(rebuilt)
    assert not c.manifest()["sides"]["images"]["lists_on_disk"] and not list(rebuilt.glob("*.ivfdata"))
    merged, whole = (d.load_side("images", use_gpu=False).index for d in (b, c))
    assert list_contents(merged) == list_contents(whole)
    assert np.load(b.side_file("images", ".ids.npy")).tolist() == np.load(c.side_file("images", ".ids.npy")).tolist()

    torchrun("reindex", str(rebuilt), "--factory", "IVF8,Flat")  # under torchrun: sharded and merged on disk
    entry = c.manifest()["sides"]["images"]
    assert entry["ranks"] == 2 and entry["factory"] == "IVF8,Flat" and entry["lists_on_disk"]
    assert sorted(p.name for p in rebuilt.glob("images-*")) == [f"images-{entry['generation']}{suffix}" for suffix in
                                                                  (".faiss", ".ids.npy", ".ivfdata", ".vectors.npy")]
    lists = c.side_file("images", ".ivfdata")
    with open(lists, "r+b") as f:
        f.truncate(lists.stat().st_size - 1)
    assert main(["check", str(rebuilt)]) == 1
    assert f"{lists}: cut short" in capsys.readouterr().out
    assert main(["repair", str(rebuilt)]) == 0 and main(["check", str(rebuilt)]) == 0
    assert IndexSearcher(rebuilt).search("a photo", k=3).results
    torchrun("reindex", str(rebuilt), "--factory", "IVF8,Flat")
    lists = c.side_file("images", ".ivfdata")
    lists.unlink()
    capsys.readouterr()
    assert main(["check", str(rebuilt)]) == 1
    assert f"{lists}: missing (the index's inverted lists)" in capsys.readouterr().out  # one line, naming the file
    assert main(["repair", str(rebuilt)]) == 0 and main(["check", str(rebuilt)]) == 0


def test_parquet_and_csv_manifests(tmp_path, sample_dir, default_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(sample_dir / "rocket.jpg"), "coffee.jpg"], "caption": ["launch", None]}),
                   tmp_path / "m.parquet")
    shutil.copy(sample_dir / "coffee.jpg", tmp_path / "coffee.jpg")  # relative paths resolve beside the manifest
    s = build(tmp_path / "m.parquet", tmp_path / "ix", default_model)
    assert s.total == 2 and s.skipped == 0
    (tmp_path / "bad.csv").write_text("file,caption\nx.jpg,y\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        build(tmp_path / "bad.csv", tmp_path / "ix2", default_model)


def test_a_training_corpus_reads_as_a_manifest(tmp_path):
    """A corpus's `image` and `text` stand for `path` and `caption` where those are missing; a manifest's own
    `caption` wins over a `text` column, kept as metadata."""
    from otclip.indexer.collection import read_image_manifest

    def rows(name: str, *listed: dict) -> Path:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in listed))
        return tmp_path / name

    items = read_image_manifest(rows("e.jsonl", {"image": "a.png", "text": "a thing", "label": "x"}))
    assert (items[0].path, items[0].caption, items[0].label) == (str(tmp_path / "a.png"), "a thing", "x")
    items = read_image_manifest(rows("f.jsonl", {"path": "a.png", "caption": "cap", "text": "other"}))
    assert (items[0].caption, items[0].extra) == ("cap", {"text": "other"})


def test_urls_in_a_manifest_are_named_as_urls(tmp_path, sample_dir, default_model):
    """A LAION-style manifest lists URLs: each was read as a path below the manifest's folder and reported as
    `/folder/https:/host/a.jpg: missing file`. A URL row is now skipped as a URL, named as listed; a manifest of
    URLs only is refused in one line."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,caption\nhttps://example.com/a.jpg,a cat\n{sample_dir / 'rocket.jpg'},a rocket\n")
    summary = build(manifest, tmp_path / "ix", default_model)
    assert (summary.total, summary.skipped) == (1, 1)
    skipped = [json.loads(line) for line in (tmp_path / "ix" / "errors.jsonl").read_text().splitlines()]
    assert skipped == [{"path": "https://example.com/a.jpg", "reason": "a URL, not a file: otclip reads files on disk: "
                                                                      "download the images first (e.g. with img2dataset)"}]
    manifest.write_text("path\nhttps://example.com/a.jpg\ns3://bucket/b.jpg\n")
    with pytest.raises(ValueError, match=r"m.csv: its 2 paths are URLs \(the first: https://example.com/a.jpg\); "
                                         "otclip reads files on disk: download the images first"):
        build(manifest, tmp_path / "ix2", default_model)


def test_a_missing_metadata_store_is_refused_and_no_embedding_is_deleted(gallery, tmp_path, default_model):
    """Before: `reindex` made a fresh empty store, then deleted every chunk it did not reference, and exited 0."""
    out = tmp_path / "idx"
    build(gallery, out, default_model)
    chunks = sorted(p.name for p in (out / "embeddings").glob("*.npy"))
    assert chunks
    (out / "metadata.sqlite").unlink()
    with pytest.raises(IndexDirectoryError, match="metadata.sqlite: missing"):
        reindex(out, "Flat")
    with pytest.raises(IndexDirectoryError, match="metadata.sqlite: missing"):
        build(gallery, out, default_model)
    assert sorted(p.name for p in (out / "embeddings").glob("*.npy")) == chunks
    assert not (out / "metadata.sqlite").exists()


def test_a_running_searcher_follows_each_new_generation(gallery, tmp_path, default_model):
    """Before: a running searcher never saw images indexed after it started, and after files were removed and
    the folder re-indexed, a query that would have returned them raised KeyError."""
    out = tmp_path / "idx"
    aside = tmp_path / "rocket.jpg"
    shutil.move(gallery / "rocket.jpg", aside)
    build(gallery, out, default_model)
    searcher = IndexSearcher(out, model=default_model)
    assert not any(r.path.endswith("rocket.jpg") for r in searcher.search_text("a rocket", k=50))

    shutil.move(aside, gallery / "rocket.jpg")
    build(gallery, out, default_model)
    assert searcher.search_text("a rocket on the launch pad", k=1)[0].path.endswith("rocket.jpg")
    assert searcher.info()["sides"]["images"]["items"] == 20

    (gallery / "chelsea.jpg").unlink()
    stale = searcher._sides  # a request that started before the re-index still holds this snapshot
    build(gallery, out, default_model)
    assert not any(r.path.endswith("chelsea.jpg") for r in searcher.search_text("a cat", k=50))
    searcher.current_sides = lambda: stale  # answer from the old snapshot, whose ids include a removed row
    assert not any(r.path.endswith("chelsea.jpg") for r in searcher.search_text("a cat", k=50))
    searcher.close()


def test_thumbnails_follow_the_indexed_contents(gallery, tmp_path, default_model):
    """One JPEG display copy per distinct content, made while indexing, deleted RETIRED_DAYS after the last image
    holding it is removed."""
    import numpy as np
    from PIL import Image

    from otclip.engine.images import load_image
    from otclip.engine.index_directory import RETIRED_DAYS, IndexDirectory
    from otclip.indexer.pipeline import index_images

    (gallery / "chelsea-copy.jpg").write_bytes((gallery / "chelsea.jpg").read_bytes())
    out = tmp_path / "ix"
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    directory = IndexDirectory(out)
    hashes = set(directory.store.hash_locations("images"))
    kept = {p.stem: p for p in (out / "thumbnails").glob("*/*.jpg")}
    assert set(kept) == hashes and len(hashes) == 20  # 21 files, 20 contents
    path_of = {row["sha256"]: key for key, row in directory.store.stats("images").items()}
    for digest in hashes:
        path = path_of[digest]
        shown = Image.open(kept[digest])
        assert shown.format == "JPEG" and max(shown.size) <= 384
        # it looks like the original: compared with an independent downscale of the full decode
        reference = load_image(path).resize(shown.size, Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(shown.convert("RGB"), float) - np.asarray(reference, float)).mean() < 12

    digest_of = {key: row["sha256"] for key, row in directory.store.stats("images").items()}
    chelsea, rocket = digest_of[str(gallery / "chelsea.jpg")], digest_of[str(gallery / "rocket.jpg")]
    directory.close()
    (gallery / "chelsea.jpg").unlink()  # its copy still holds the content
    (gallery / "rocket.jpg").unlink()  # the last image holding this content
    index_images(gallery, out, "effnet-minilm", progress=False, workers=0)
    assert directory.thumbnail_path(chelsea).exists() and directory.thumbnail_path(rocket).exists()  # kept: retired
    _age_retired(out, RETIRED_DAYS + 1)
    index_images(gallery, out, "effnet-minilm", progress=False, workers=0)
    assert directory.thumbnail_path(chelsea).exists() and not directory.thumbnail_path(rocket).exists()

    bare = tmp_path / "bare"
    index_images(gallery, bare, default_model, progress=False, workers=0, query_models=False, thumbnails=False)
    assert not (bare / "thumbnails").exists()


def test_a_second_writer_waits_for_the_first_and_leftovers_are_cleaned(gallery, tmp_path, default_model, capfd):
    """#13 item 6: one writer at a time (the second waits, naming the holder); item 7: temp files of killed
    runs are removed by the next run."""
    import subprocess
    import sys
    import time

    from otclip.indexer.pipeline import index_images

    out = tmp_path / "ix"
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    thumbnail_folder = next((out / "thumbnails").iterdir())
    leftovers = (out / ".manifest.json.tmp4242", out / ".images-7.faiss.tmp4242", out / "embeddings" / ".x.npy.tmp1",
                 out / "embeddings" / "records" / ".x.json.tmp1", thumbnail_folder / ".ab.jpg.tmp99",
                 out / ".metadata.sqlite.tmp5", out / "images-9.trained.faiss", out / "images-9.shard-1.faiss")
    for leftover in leftovers:
        leftover.write_bytes(b"half-written")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom otclip.engine.index_directory import IndexDirectory\n"
         f"with IndexDirectory({str(out)!r}).writing():\n    print('HELD', flush=True)\n    time.sleep(3)\n"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "HELD"
    started = time.time()
    (gallery / "rocket.jpg").unlink()
    summary = index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    waited = time.time() - started
    holder.wait(30)
    assert summary.removed == 1 and summary.total == 19
    assert waited > 1.0  # it waited for the holder's 3 s instead of writing beside it
    assert f"is being written by pid {holder.pid}" in capfd.readouterr().err
    assert not [leftover for leftover in leftovers if leftover.exists()]


def test_bad_settings_fail_before_anything_is_embedded(gallery, tmp_path, default_model):
    import pytest

    from otclip.engine.errors import IndexDirectoryError
    from otclip.indexer.pipeline import index_images

    with pytest.raises(ValueError, match="--chunk-size 0"):
        index_images(gallery, tmp_path / "a", default_model, chunk_size=0, progress=False)
    out = tmp_path / "b"
    with pytest.raises(ValueError, match="not a valid FAISS index description"):
        index_images(gallery, out, default_model, factory="Bogus99", progress=False, workers=0)
    assert not list((out / "embeddings").glob("*.npy"))  # nothing was embedded first
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(IndexDirectoryError, match="is a file"):
        index_images(gallery, tmp_path / "file", default_model, progress=False)
    before = sorted(gallery.iterdir())  # an index in the photos' own folder: its thumbnails would become photos
    with pytest.raises(ValueError, match=f"--out {gallery}/: the folder being indexed; .* --out {gallery}/.otclip"):
        index_images(gallery, f"{gallery}/", default_model, progress=False)
    assert sorted(gallery.iterdir()) == before


def test_an_empty_source_does_not_empty_the_index(gallery, tmp_path, default_model):
    """The index mirrors its source, so a source with nothing in it (a drive not mounted, a wrong path) would
    remove every item and cost their embeddings: refused in one line, nothing removed; a new index may start
    empty."""
    import pytest

    from otclip.engine.errors import IndexDirectoryError
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images, index_texts

    out, empty = tmp_path / "ix", tmp_path / "unmounted"
    empty.mkdir()
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False, thumbnails=False)
    captions = tmp_path / "captions.txt"
    captions.write_text("a tabby cat\na rocket\n")
    index_texts(captions, out, default_model, progress=False, query_models=False)
    blank, moved = tmp_path / "blank.txt", tmp_path / "moved.csv"
    blank.write_text("\n\n")
    moved.write_text("path\n/mnt/unmounted/a.jpg\n/mnt/unmounted/b.jpg\n")  # a manifest of a drive not mounted
    for source, message in ((empty, "no images in it"), (moved, "none of the 2 images it lists can be read"),
                            (blank, "no texts in it")):
        run = index_texts if source == blank else index_images
        with pytest.raises(IndexDirectoryError, match=f"{message}, but the index holds (20|2); nothing was removed"):
            run(source, out, default_model, progress=False)
    searcher = IndexSearcher(out, model=default_model)
    assert len(searcher.search("a cat", k=50).results) == 20
    assert len(searcher.search("a cat", k=50, target="texts").results) == 2
    assert index_images(empty, tmp_path / "new", default_model, progress=False, workers=0).total == 0


def _age_retired(out, days):
    """As if the retired contents had been removed `days` days earlier."""
    import sqlite3

    with sqlite3.connect(out / "metadata.sqlite") as db:
        db.execute("UPDATE retired SET retired_at = retired_at - ?", (days * 86400,))


def test_photos_that_come_back_reuse_their_kept_embeddings(gallery, tmp_path, default_model, encoder):
    """Photos that vanish (a drive not mounted, a folder moved out) leave the index, but their embeddings and
    thumbnails are kept for RETIRED_DAYS: when they come back nothing is embedded (no model is even loaded), and
    each gets its own content's embedding, size and thumbnail; after RETIRED_DAYS the kept ones are deleted."""
    from otclip.engine.index_directory import RETIRED_DAYS
    from otclip.engine.index_repair import find_problems

    out, offline = tmp_path / "ix", tmp_path / "offline"
    offline.mkdir()
    late = ["rocket.jpg", "moon.jpg"]  # added by a later run: their own embedding chunk
    for name in late:
        shutil.move(gallery / name, offline / name)
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    for name in late:
        shutil.move(offline / name, gallery / name)
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    chunks = sorted(p.name for p in (out / "embeddings").glob("*.npy"))
    assert len(chunks) == 2

    gone = sorted(p.name for p in gallery.iterdir())[::2] + late  # 12 of the 20, the late chunk's two among them
    for name in set(gone):
        shutil.move(gallery / name, offline / name)
    s = index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    assert (s.removed, s.total, s.embedded, s.model_loaded) == (len(set(gone)), 20 - len(set(gone)), 0, False)
    assert not {r.path for r in IndexSearcher(out, model=default_model).search("a photo", k=20).results} & {
        str(gallery / name) for name in gone}
    assert sorted(p.name for p in (out / "embeddings").glob("*.npy")) == chunks  # kept for their return
    directory = IndexDirectory(out)
    assert len(directory.store.retired("images")) == len(set(gone)) and find_problems(directory) == []
    directory.close()
    assert f"{len(set(gone))} removed image content(s) keep their embedding" in subprocess.run(
        [sys.executable, "-m", "otclip.main", "info", str(out)], capture_output=True, text=True).stdout

    for name in set(gone):  # the drive is back
        shutil.move(offline / name, gallery / name)
    s = index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    assert (s.returned, s.embedded, s.total, s.model_loaded) == (len(set(gone)), 0, 20, False)
    assert f"0 duplicates, {len(set(gone))} came back)" in s.line()
    directory = IndexDirectory(out)
    stats = directory.store.stats("images")
    paths = [str(gallery / name) for name in sorted(set(gone))]
    kept = directory.vectors_at([(stats[p]["shard"], stats[p]["row"]) for p in paths])
    np.testing.assert_allclose(kept, encoder.encode_images(paths), atol=1e-4)  # each its own content's embedding
    assert stats[str(gallery / "chelsea.jpg")]["width"] == 451
    assert directory.store.retired("images") == {} and find_problems(directory) == []  # thumbnails all there
    directory.close()
    top = IndexSearcher(out, model=default_model).search_image(gallery / "chelsea.jpg", k=1)[0]
    assert top.path.endswith("chelsea.jpg") and top.score == pytest.approx(1.0, abs=1e-4)

    for name in late:  # removed again, and not back within RETIRED_DAYS
        shutil.move(gallery / name, offline / name)
    index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    digests = list(IndexDirectory(out).store.retired("images"))
    assert len(digests) == 2 and all(IndexDirectory(out).thumbnail_path(d).exists() for d in digests)
    _age_retired(out, RETIRED_DAYS - 1)
    index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    assert len(IndexDirectory(out).store.retired("images")) == 2
    _age_retired(out, 2)
    index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    directory = IndexDirectory(out)
    assert directory.store.retired("images") == {}
    assert not any(directory.thumbnail_path(d).exists() for d in digests)
    assert len(list((out / "embeddings").glob("*.npy"))) == 1  # the late chunk is deleted
    directory.close()
    for name in late:
        shutil.move(offline / name, gallery / name)
    s = index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    assert (s.returned, s.embedded, s.total) == (0, 2, 20)


def test_a_kept_embedding_that_cannot_be_read_is_forgotten(gallery, tmp_path, default_model, encoder):
    """A retired content's chunk cut short: the kept embedding is forgotten (nothing else is touched) and the photo,
    when it comes back, is embedded again."""
    out, offline = tmp_path / "ix", tmp_path / "offline"
    offline.mkdir()
    shutil.move(gallery / "rocket.jpg", offline / "rocket.jpg")
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    shutil.move(offline / "rocket.jpg", gallery / "rocket.jpg")
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    shutil.move(gallery / "rocket.jpg", offline / "rocket.jpg")
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    (kept,) = IndexDirectory(out).store.retired("images").values()
    chunk = out / "embeddings" / f"{kept['shard']}.npy"
    chunk.write_bytes(chunk.read_bytes()[:100])
    shutil.move(offline / "rocket.jpg", gallery / "rocket.jpg")
    s = index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    assert (s.returned, s.embedded, s.total, s.repaired) == (0, 1, 20, 0)
    directory = IndexDirectory(out)
    row = directory.store.stats("images")[str(gallery / "rocket.jpg")]
    np.testing.assert_allclose(directory.vectors_at([(row["shard"], row["row"])]),
                               encoder.encode_images([str(gallery / "rocket.jpg")]), atol=1e-4)
    assert not chunk.exists()


def test_a_store_of_the_schema_before_retired_contents_reads_as_keeping_none(tmp_path):
    """A searcher on a read-only disk does not migrate an older store: `info` must still read it."""
    import sqlite3

    from otclip.engine.metadata_store import MetadataStore

    path = tmp_path / "metadata.sqlite"
    MetadataStore(path).close()
    with sqlite3.connect(path) as db:
        db.executescript("DROP TABLE retired; UPDATE meta SET value='3' WHERE key='schema_version'")
    reader = MetadataStore(path, readonly=True)
    assert (reader.schema_version(), reader.retired_count("images")) == (3, 0)
    reader.close()
    migrated = MetadataStore(path)
    assert (migrated.schema_version(), migrated.retired_count("images")) == (4, 0)
    migrated.close()


def test_a_file_name_that_is_not_utf8_is_skipped_and_named(gallery, tmp_path, default_model):
    """A name written in a Windows code page (bytes that are not UTF-8) cannot go into the store, the JSON files
    or the browser: that file is skipped with the reason, named with its byte escaped; the others are indexed."""
    os.rename(gallery / "coffee.jpg", os.fsencode(gallery) + b"/caf\xe9.jpg")
    out = tmp_path / "ix"
    s = index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    assert (s.total, s.skipped) == (19, 1)
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert error["path"] == f"{gallery}/caf\\xe9.jpg" and "not UTF-8: rename it" in error["reason"]
    assert index_images(gallery, out, default_model, progress=False, workers=0, query_models=False).skipped == 1


def test_a_folder_that_cannot_be_listed_is_reported(sample_dir, tmp_path):
    """`os.walk` passes over a folder it cannot list in silence: its photos would vanish from the index unexplained.
    It is skipped and listed in errors.jsonl; a source that cannot be listed at all is refused, naming it."""
    photos, out = tmp_path / "photos", tmp_path / "ix"
    locked = photos / "locked"
    locked.mkdir(parents=True)
    for name, folder in (("chelsea.jpg", photos), ("coffee.jpg", photos), ("rocket.jpg", locked)):
        shutil.copy(sample_dir / name, folder / name)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    as_user = drop if os.geteuid() == 0 else []  # root lists any folder: run without that capability

    def index(source):
        return subprocess.run([*as_user, sys.executable, "-m", "otclip.main", "index", str(source), "--out", str(out),
                               "--no-progress", "--no-query-export"], capture_output=True, text=True, timeout=300)

    locked.chmod(0)
    try:
        done = index(photos)
        assert done.returncode == 0, done.stderr
        assert "2 indexed" in done.stdout and "1 skipped" in done.stdout
        (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        assert error == {"path": str(locked),
                         "reason": "folder cannot be read (Permission denied): the images in it are left out"}
        photos.chmod(0)
        done = index(photos)
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert f"no images in it ({photos}: folder cannot be read (Permission denied)), but the index holds 2" in done.stderr
    finally:
        photos.chmod(0o755)
        locked.chmod(0o755)
    assert sorted(os.path.basename(p) for p in paths_in(out)) == ["chelsea.jpg", "coffee.jpg"]


def test_nas_thumbnails_trash_and_hidden_files_are_not_photos(sample_dir, tmp_path, default_model, capsys):
    """A Synology share holds five thumbnails of each photo in @eaDir, macOS leaves a ._ file (not an image) beside
    each photo it copies to a FAT or SMB drive: left out by default, with the user's --exclude patterns; hidden
    ones come back with --include-hidden. The index keeps the last ones given for later runs, each flag changing
    its own part. A manifest lists what it means: patterns are refused for it."""
    from otclip.engine.exclusions import Exclusions

    photos = tmp_path / "photos"
    layout = {"chelsea.jpg": "chelsea", "trip/rocket.jpg": "rocket", "trip/@eaDir/rocket.jpg/SYNOPHOTO_THUMB_XL.jpg":
              "rocket", "#recycle/coffee.jpg": "coffee", ".thumbnails/moon.jpg": "moon", "2019/private/cat.jpg":
              "chelsea", "2019/public/coffee.jpg": "coffee", "Screenshots/grass.jpg": "grass",
              "$RECYCLE.BIN/S-1-5/brick.jpg": "brick", "trip/.@__thumb/rocket.jpg": "rocket"}
    for relative, name in layout.items():
        (photos / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_dir / f"{name}.jpg", photos / relative)
    (photos / "trip" / "._rocket.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(4092))  # AppleDouble: not an image
    out = tmp_path / "ix"

    def indexed(exclusions):
        s = index_images(photos, out, default_model, progress=False, workers=0, query_models=False,
                         thumbnails=False, exclusions=exclusions)
        errors = [json.loads(line)["path"] for line in (out / "errors.jsonl").read_text().splitlines()]
        return sorted(os.path.relpath(p, photos) for p in paths_in(out)), [os.path.relpath(p, photos) for p in errors], s

    kept, errors, _ = indexed(Exclusions(("Screenshots", "2019/private")))
    assert kept == ["2019/public/coffee.jpg", "chelsea.jpg", "trip/rocket.jpg"] and errors == []
    kept, errors, s = indexed(Exclusions(include_hidden=True))
    assert kept == [".thumbnails/moon.jpg", "2019/private/cat.jpg", "2019/public/coffee.jpg", "Screenshots/grass.jpg",
                    "chelsea.jpg", "trip/.@__thumb/rocket.jpg", "trip/rocket.jpg"]
    assert errors == ["trip/._rocket.jpg"] and s.removed == 0
    assert main(["index", str(photos), "--out", str(out), "--include-hidden", "--exclude", "Screenshots",
                 "--exclude", "2019", "--no-progress", "--no-thumbnails"]) == 0  # the command's flags
    assert sorted(os.path.relpath(p, photos) for p in paths_in(out)) == [
        ".thumbnails/moon.jpg", "chelsea.jpg", "trip/.@__thumb/rocket.jpg", "trip/rocket.jpg"]
    capsys.readouterr()

    def run_without_model(*flags: str) -> list[str]:  # every content has been embedded before: no model loads
        assert main(["index", str(photos), "--out", str(out), "--no-progress", "--no-thumbnails", *flags]) == 0
        assert "0 embedded" in capsys.readouterr().out
        return sorted(os.path.relpath(p, photos) for p in paths_in(out))

    # kept with the index: a run without the flags leaves out what they left out, and says so
    assert run_without_model() == [".thumbnails/moon.jpg", "chelsea.jpg", "trip/.@__thumb/rocket.jpg", "trip/rocket.jpg"]
    assert main(["info", str(out)]) == 0
    assert "excludes  --exclude Screenshots --exclude 2019 --include-hidden (kept" in capsys.readouterr().out
    kept = index_images(photos, out, default_model, progress=False, workers=0, query_models=False, thumbnails=False)
    assert kept.total == 4 and kept.removed == 0  # the API alike
    assert run_without_model("--no-include-hidden") == ["chelsea.jpg", "trip/rocket.jpg"]  # the patterns stay
    assert run_without_model("--exclude", "trip") == [  # replaces the patterns; hidden names stay out
        "2019/private/cat.jpg", "2019/public/coffee.jpg", "Screenshots/grass.jpg", "chelsea.jpg"]
    assert run_without_model("--no-exclude") == [  # the defaults alone
        "2019/private/cat.jpg", "2019/public/coffee.jpg", "Screenshots/grass.jpg", "chelsea.jpg", "trip/rocket.jpg"]
    assert "exclusions" not in json.loads((out / "manifest.json").read_text())
    assert run_without_model() == [
        "2019/private/cat.jpg", "2019/public/coffee.jpg", "Screenshots/grass.jpg", "chelsea.jpg", "trip/rocket.jpg"]
    assert "as kept" not in capsys.readouterr().err
    damaged = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**damaged, "exclusions": {"patterns": "Screenshots"}}))
    with pytest.raises(IndexDirectoryError, match="manifest.json: its exclusions entry is damaged"):
        IndexDirectory(out).kept_exclusions()
    (out / "manifest.json").write_text(json.dumps(damaged))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{photos / 'chelsea.jpg'}\n")
    with pytest.raises(ValueError, match="--exclude and --include-hidden apply to a folder, not to a manifest"):
        index_images(manifest, out, default_model, progress=False, exclusions=Exclusions(("x",)))
    assert Exclusions(("*/Screenshots",)).covers("2020/Screenshots/a.jpg")
    assert not Exclusions(("*/Screenshots",)).covers("Screenshots/a.jpg")  # a pattern with "/" is a relative path


def test_camera_raw_files_are_indexed_unless_a_developed_photo_stands_for_them(tmp_path, default_model, encoder):
    """A RAW file alone is indexed (its size as shown, a thumbnail, its embedding that of its decoded picture); one
    beside a JPEG of the same name (RAW+JPEG shooting) is left out, the JPEG stands for it; a broken one is named."""
    from PIL import Image
    from raw_files import write_dng

    from otclip.engine.images import load_image

    photos, out = tmp_path / "photos", tmp_path / "ix"
    photos.mkdir()
    scene = np.zeros((256, 384, 3))
    scene[:, :192], scene[:, 192:] = [0.8, 0.4, 0.1], [0.1, 0.3, 0.8]
    write_dng(photos / "IMG_1.DNG", scene)
    Image.fromarray((scene ** (1 / 2.2) * 255).astype(np.uint8)).save(photos / "IMG_1.JPG")  # shot RAW+JPEG
    write_dng(photos / "IMG_2.dng", scene[:, ::-1].copy(), preview=False, orientation=6)
    (photos / "IMG_3.NEF").write_bytes(b"MM\0*" + bytes(500))
    s = index_images(photos, out, default_model, progress=False, workers=0, query_models=False)
    assert sorted(os.path.basename(p) for p in paths_in(out)) == ["IMG_1.JPG", "IMG_2.dng"]
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["path"].endswith("IMG_3.NEF") and "RAW file cannot be decoded" in error["reason"] and s.skipped == 1
    directory = IndexDirectory(out)
    row = directory.store.stats("images")[str(photos / "IMG_2.dng")]
    assert (row["width"], row["height"]) == (256, 384) and directory.thumbnail_path(row["sha256"]).exists()
    np.testing.assert_allclose(directory.vectors_at([(row["shard"], row["row"])])[0],
                               encoder.encode_images([load_image(photos / "IMG_2.dng", draft=224)])[0], atol=1e-4)
    directory.close()
    hits = IndexSearcher(out, model=default_model).search_image(photos / "IMG_2.dng", k=1)  # a RAW file as the query
    assert hits[0].path.endswith("IMG_2.dng") and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_another_source_that_would_take_photos_out_is_refused(gallery, tmp_path, default_model, capsys):
    """An index mirrors one source: indexing another folder into it had replaced the collection in silence (a
    second year's folder took the first year's photos out of search). Now a run of another source than the one kept
    (`manifest.json` "source") that would take photos out is refused in one line, nothing changed; one that only
    adds (a parent folder) is not; `--replace` indexes the other source in its place, moved photos not embedded."""
    import pytest

    from otclip.indexer.pipeline import SourceSwitchError, index_images
    from otclip.main import main

    library = tmp_path / "library"
    library.mkdir()
    year1, year2 = gallery.rename(library / "2023"), library / "2024"
    year2.mkdir()
    shutil.copy(year1 / "rocket.jpg", year2 / "launch.jpg")
    out = tmp_path / "ix"
    index_images(year1, out, default_model, progress=False, workers=0, query_models=False, thumbnails=False)
    assert json.loads((out / "manifest.json").read_text())["source"] == str(year1.resolve())

    def held() -> set[str]:
        with sqlite3.connect(out / "metadata.sqlite") as db:
            return {key for (key,) in db.execute("SELECT key FROM items WHERE side = 'images'")}

    before = held()
    with pytest.raises(SourceSwitchError, match=f"{year2}: not the source {out} mirrors \\({year1}\\), and indexing "
                                                "it would take 20 of its 20 photos out.*--replace"):
        index_images(year2, out, default_model, progress=False, workers=0)
    assert held() == before and len(before) == 20
    code = main(["index", str(year2), "--out", str(out), "--no-progress"])
    assert code == 2 and "--replace" in capsys.readouterr().err  # the command line: one line, exit 2
    assert main(["info", str(out)]) == 0 and f"source    {year1.resolve()} (the images mirror it)" in capsys.readouterr().out

    summary = index_images(library, out, default_model, progress=False, workers=0, query_models=False)
    assert (summary.total, summary.removed, summary.embedded) == (21, 0, 0)  # a parent folder only adds
    with pytest.raises(SourceSwitchError, match="would take 1 of its 21 photos out"):
        index_images(year1, out, default_model, progress=False, workers=0)  # a subfolder would drop the rest
    moved = library.rename(tmp_path / "moved")  # the library moved elsewhere: in its place, nothing embedded again
    summary = index_images(moved, out, default_model, progress=False, workers=0, query_models=False, replace=True)
    assert (summary.total, summary.removed, summary.embedded) == (21, 21, 0)
    assert json.loads((out / "manifest.json").read_text())["source"] == str(moved.resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "source": ["not", "a", "path"]}))
    with pytest.raises(IndexDirectoryError, match="manifest.json: its source entry is damaged"):
        IndexDirectory(out).kept_source()


def test_a_pipe_or_a_device_named_as_a_photo_is_skipped_not_read(sample_dir, tmp_path, default_model):
    """Reading a pipe waits for a writer and /dev/zero never ends: a folder holding either under an image's name (or a
    manifest listing a folder) hung the run, in silence. Each is skipped with what it is; the photo is indexed. A
    manifest lists them (a folder's walk gives the same paths to the same check); the device is /dev/null, which a
    regression reads to its end at once, and the pipe is written to if the run is still waiting after a minute."""
    import threading

    photos, out = tmp_path / "photos", tmp_path / "ix"
    photos.mkdir()
    shutil.copy(sample_dir / "chelsea.jpg", photos / "chelsea.jpg")
    os.mkfifo(photos / "pipe.jpg")
    os.symlink("/dev/null", photos / "null.png")
    (photos / "folder.jpg").mkdir()
    manifest = tmp_path / "listed.csv"
    manifest.write_text("path\n" + "".join(f"{photos / name}\n" for name in ("chelsea.jpg", "pipe.jpg", "null.png",
                                                                              "folder.jpg")))
    summary = []
    run = threading.Thread(target=lambda: summary.append(index_images(manifest, out, default_model, progress=False,
                                                                      workers=0, query_models=False)))
    run.start()
    run.join(timeout=60)
    if run.is_alive():  # waiting on the pipe: give it an end, so that the test fails rather than hangs
        with open(photos / "pipe.jpg", "wb"):
            pass
        run.join()
    assert (summary[0].total, summary[0].skipped) == (1, 3)
    errors = {e["path"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").open())}
    assert errors == {str(photos / "pipe.jpg"): "not a file (a pipe)", str(photos / "folder.jpg"): "not a file (a folder)",
                      str(photos / "null.png"): "not a file (a device or socket)"}


def test_load_image_refuses_a_pipe_without_opening_it(tmp_path):
    import threading

    from otclip.engine.images import ImageDecodeError, load_image

    os.mkfifo(tmp_path / "pipe.jpg")
    outcome = []

    def load():
        try:
            load_image(tmp_path / "pipe.jpg")
        except ImageDecodeError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # blocked in open(): let it go by writing to the pipe
        with open(tmp_path / "pipe.jpg", "wb"):
            pass
    assert outcome == [f"{tmp_path / 'pipe.jpg'}: not a file (a pipe)"]
