"""Fault injection (#13): each file of an index directory deleted or cut in half, one at a time. Whatever is
damaged, a search answers exactly as before or fails in one line naming the file (never a traceback, never a
silently different answer); `otclip check` names the file; `otclip repair` then the usual `otclip index` /
`index-texts` bring back an index that answers exactly as before.
(Killed runs: test_indexing.py::test_kill_and_resume, and below, a run stopped at each commit point; a full disk:
test_cli.py; hostile images: tests/engine/test_images.py and tests/app/test_api.py.)"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from otclip.indexer.pipeline import index_images, index_texts
from otclip.main import main

FILES = {  # what is damaged -> where it is, in a copy of the pristine index
    "manifest": "manifest.json",
    "metadata store": "metadata.sqlite",
    "FAISS index": "images-*.faiss",
    "FAISS ids": "images-*.ids.npy",
    "FAISS-ordered vectors": "images-*.vectors.npy",
    "text-side FAISS index": "texts-*.faiss",
    "embedding chunk": "embeddings/images-*.npy",
    "records file": "embeddings/records/images-*-r0-*.json",
    "removal records": "embeddings/records/images-*-removed.json",
    "thumbnail": "thumbnails/*/*.jpg",
}
HARMLESS = {"errors list": "errors.jsonl", "writer lock": ".writer.lock"}  # nothing reads them back
SEARCH = ["a cat", "-k", "10", "--json"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, sample_dir, default_model):
    """5 photos in chunks of 2 (a sixth indexed, then removed), 3 texts; store checkpointed into one file."""
    root = tmp_path_factory.mktemp("pristine")
    photos = root / "photos"
    photos.mkdir()
    for name in ["chelsea", "rocket", "coffee", "astronaut", "horse", "camera"]:
        shutil.copy(sample_dir / f"{name}.jpg", photos / f"{name}.jpg")
    build = dict(model=default_model, progress=False, workers=0, chunk_size=2, query_models=False)
    index_images(photos, root / "ix", **build)
    (photos / "camera.jpg").unlink()
    index_images(photos, root / "ix", **build)
    (root / "texts.txt").write_text("a cat\na rocket\na cup of coffee\n")
    index_texts(root / "texts.txt", root / "ix", default_model, progress=False, query_models=False)
    with sqlite3.connect(root / "ix" / "metadata.sqlite") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return root


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def items(index: Path) -> list[tuple]:
    with sqlite3.connect(index / "metadata.sqlite") as db:
        return sorted(db.execute("SELECT side, key, sha256, text, width, height FROM items").fetchall(), key=repr)


def answer(capsys, index: Path) -> tuple[int, object, str]:
    code, out, err = run(capsys, "search", index, *SEARCH)
    texts = run(capsys, "search", index, *SEARCH, "--target", "texts") if code == 0 else (code, "", err)
    if code == 0 and texts[0] == 0:
        rounded = [[(r.get("path"), r.get("text"), round(r["score"], 4)) for r in json.loads(o)] for o in (out, texts[1])]
        return 0, rounded, ""
    return max(code, texts[0]), None, err or texts[2]


@pytest.fixture
def copy(pristine, tmp_path):
    index = tmp_path / "ix"
    shutil.copytree(pristine / "ix", index)
    return index


@pytest.mark.parametrize("how", ["delete", "cut in half"])
@pytest.mark.parametrize("what", FILES)
def test_damage_to_one_file_is_named_and_repaired(what, how, pristine, copy, default_model, capsys):
    expected = answer(capsys, pristine / "ix")
    before = items(pristine / "ix")
    target = sorted(copy.glob(FILES[what]))[0]
    if how == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

    code, found, err = answer(capsys, copy)
    assert (code, found) == expected[:2] or (code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
                                             and str(copy) in err), err
    code, out, _ = run(capsys, "check", copy)
    assert code == 1 and str(target) in out, out

    code, out, _ = run(capsys, "repair", copy)
    assert "Traceback" not in out
    index_images(pristine / "photos", copy, default_model, progress=False, workers=0, query_models=False)
    index_texts(pristine / "texts.txt", copy, default_model, progress=False, query_models=False)
    assert run(capsys, "check", copy)[0] == 0
    assert answer(capsys, copy) == expected
    assert items(copy) == before


@pytest.mark.parametrize("what", HARMLESS)
def test_files_nothing_reads_back_may_go(what, pristine, copy, capsys):
    (copy / HARMLESS[what]).unlink()
    assert answer(capsys, copy) == answer(capsys, pristine / "ix")
    assert run(capsys, "check", copy)[0] == 0


class Died(BaseException):
    """Raised where the process would die: past every `except Exception`."""


@pytest.fixture
def renames(monkeypatch):
    """renames(n, before): the n-th rename of what runs next (every commit point of otclip is an atomic rename)
    raises Died just before or just after it happens; n=0 counts them. renames.count: how many were made."""
    import os

    real = os.replace

    def arm(n: int = 0, before: bool = False) -> None:
        arm.count = 0

        def replace(src, dst):
            arm.count += 1
            if arm.count == n and before:
                raise Died(dst)
            real(src, dst)
            if arm.count == n:
                raise Died(dst)

        monkeypatch.setattr(os, "replace", replace)

    arm.undo = lambda: monkeypatch.setattr(os, "replace", real)
    return arm


def test_a_run_stopped_at_each_commit_point_resumes_to_the_same_index(pristine, tmp_path, default_model, renames):
    """An index of 3 photos built from nothing, dying at each of its renames in turn (before and after): the
    next run always finishes with the reference's items, and its records rebuild the same store."""
    from otclip.engine.index_directory import IndexDirectory
    from otclip.engine.index_repair import repair

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((pristine / "photos").glob("*.jpg"))[:3]:
        shutil.copy(path, photos / path.name)
    build = dict(model=default_model, progress=False, workers=0, chunk_size=2, query_models=False,
                 thumbnails=False)
    reference = tmp_path / "reference"
    renames()
    index_images(photos, reference, **build)
    renames.undo()
    assert renames.count >= 10  # 2 chunks x (vectors, records, records kept), errors.jsonl, FAISS, ids, vectors, manifest x 2
    stopped_at = []
    for n in range(1, renames.count + 1):
        for before in (True, False):
            index = tmp_path / f"ix-{n}-{before}"
            renames(n, before)
            with pytest.raises(Died) as died:
                index_images(photos, index, **build)
            renames.undo()
            stopped_at.append(Path(str(died.value)).name)
            index_images(photos, index, **build)
            assert items(index) == items(reference), (n, before)
            for path in index.glob("metadata.sqlite*"):
                path.unlink()
            repair(IndexDirectory(index))
            assert items(index) == items(reference), (n, before)
    assert "manifest.json" in stopped_at and any(name.endswith(".faiss") for name in stopped_at)


def test_a_run_stopped_at_each_commit_point_keeps_the_thumbnails_of_what_it_wrote(pristine, tmp_path, default_model,
                                                                                 renames):
    """Retired contents expire at the start of a run, which deletes their thumbnails: a killed run's written (not yet
    committed) chunk must be committed first, or its new photo's thumbnail would go while its item stays."""
    from otclip.engine.index_directory import RETIRED_DAYS, IndexDirectory
    from otclip.engine.index_repair import find_problems

    photos, offline = tmp_path / "photos", tmp_path / "offline"
    photos.mkdir()
    offline.mkdir()
    first, second, new = sorted((pristine / "photos").glob("*.jpg"))[:3]
    build = dict(model=default_model, progress=False, workers=0, query_models=False)
    stopped = 0
    for n in range(1, 20):
        index = tmp_path / f"ix-{n}"
        for path in (first, second):
            shutil.copy(path, photos / path.name)
        (photos / new.name).unlink(missing_ok=True)
        index_images(photos, index, **build)
        (photos / second.name).unlink()  # retired
        index_images(photos, index, **build)
        shutil.copy(new, photos / new.name)
        renames(n)
        try:
            index_images(photos, index, **build)
        except Died:
            stopped += 1
        finally:
            renames.undo()
        with sqlite3.connect(index / "metadata.sqlite") as db:  # the retired content expires before the next run
            db.execute("UPDATE retired SET retired_at = retired_at - ?", ((RETIRED_DAYS + 1) * 86400,))
        index_images(photos, index, **build)
        directory = IndexDirectory(index)
        assert find_problems(directory) == [] and directory.store.retired("images") == {}, n
        assert sorted(Path(k).name for k in directory.store.stats("images")) == sorted([first.name, new.name])
        directory.close()
        if renames.count < n:  # the run finished before the n-th rename: every commit point was tried
            break
    assert stopped >= 5
