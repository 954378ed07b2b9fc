import json
import shutil
import subprocess
import sys


def otclip(*args):
    done = subprocess.run([sys.executable, "-m", "otclip", *map(str, args)], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_cli_index_search_info_reindex(gallery, tmp_path):
    out = tmp_path / "ix"
    code, stdout, _ = otclip("index", gallery, "--out", out, "--no-progress", "--workers", "0")
    assert code == 0 and "images: 20 indexed" in stdout
    captions = tmp_path / "captions.csv"
    captions.write_text("text,label\na tabby cat,animal\na rocket on the launch pad,vehicle\n")
    assert otclip("index-texts", captions, "--out", out, "--no-progress")[0] == 0
    code, stdout, _ = otclip("search", out, "a cat", "-k", "2", "--json")
    results = json.loads(stdout)
    assert code == 0 and results[0]["path"].endswith("chelsea.jpg") and {"rank", "score", "path"} <= set(results[0])
    code, stdout, _ = otclip("search", out, "--image", gallery / "rocket.jpg", "--target", "texts", "-k", "1", "--json")
    assert json.loads(stdout)[0]["text"] == "a rocket on the launch pad"
    code, stdout, _ = otclip("search", out, "a cat", "-k", "3")
    assert stdout.splitlines()[0].split()[0] == "1" and "chelsea.jpg" in stdout.splitlines()[0]
    code, stdout, _ = otclip("search", out, "a cat", "--min-score", "0.99")
    assert code == 0 and "no results above score 0.99" in stdout
    code, stdout, _ = otclip("info", out, "--json")
    info = json.loads(stdout)
    assert info["sides"]["images"]["items"] == 20 and info["sides"]["texts"]["items"] == 2
    assert info["model"]["name"] == "effnet-minilm"
    code, stdout, _ = otclip("reindex", out, "--factory", "IVF2,Flat")
    assert code == 0 and "IVF2,Flat" in stdout


def test_cli_errors_are_one_line(tmp_path):
    code, _, stderr = otclip("search", tmp_path / "nothing", "a cat")
    assert code == 2 and "not an otclip index" in stderr and "Traceback" not in stderr
    code, _, stderr = otclip("index", tmp_path / "missing", "--out", tmp_path / "ix")
    assert code == 2 and "no such folder or manifest" in stderr
    code, _, stderr = otclip("index", tmp_path, "--out", tmp_path / "ix2", "--factory", "Bogus99")
    assert code == 2 and "not a valid FAISS index description" in stderr


def test_rank_skips_what_it_cannot_read(sample_dir, tmp_path, capsys):
    """As `otclip index` does: an empty or damaged file is skipped and named (it had refused the whole folder); a
    folder named like an image is not listed; a folder with no readable image is refused in one line."""
    from otclip.main import main

    shutil.copy(sample_dir / "chelsea.jpg", tmp_path / "chelsea.jpg")
    (tmp_path / "empty.jpg").touch()
    (tmp_path / "cut.png").write_bytes((sample_dir / "rocket.jpg").read_bytes()[:100])
    (tmp_path / "album.jpg").mkdir()
    code = main(["rank", "a cat", "--images", str(tmp_path), "-k", "5"])
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines()[1].endswith("chelsea.jpg") and len(out.splitlines()) == 2
    assert err.startswith("otclip rank: skipped 2 of 3 images: ") and "and 1 more" in err and len(err.splitlines()) == 1
    (tmp_path / "chelsea.jpg").unlink()
    code = main(["rank", "a cat", "--images", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2 and not out and err.splitlines()[-1] == f"otclip rank: {tmp_path}: none of its 2 images can be read"


def test_cli_rank_over_a_folder(gallery, tmp_path, capsys):
    from otclip.main import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (gallery / "@eaDir" / "chelsea.jpg").mkdir(parents=True)  # a NAS's thumbnail of the cat: not a photo
    shutil.copy(gallery / "chelsea.jpg", gallery / "@eaDir" / "chelsea.jpg" / "SYNOPHOTO_THUMB_XL.jpg")
    code, stdout, _ = otclip("rank", "a cat", "--images", gallery, "-k", "2")
    assert code == 0 and stdout.splitlines()[1].strip().endswith("chelsea.jpg") and len(stdout.splitlines()) == 3
    assert "SYNOPHOTO" not in stdout
    for args, message in ((["a cat", "-k", "-3", "--images", gallery], "-k -3: must be at least 1"),
                          (["a cat", "-k", "0", "--images", gallery], "-k 0: must be at least 1"),
                          (["a cat", "--images", empty], f"{empty}: no images"),
                          (["a cat", " ", "--images", gallery], "empty query")):
        code = main(["rank", *map(str, args)])  # in this process: refused before any model loads
        stdout, stderr = capsys.readouterr()
        assert code == 2 and message in stderr and not stdout, (args, stderr)


def test_an_unchanged_folder_is_reindexed_without_the_model(gallery, tmp_path, default_model):
    """No-op re-index: decided from the metadata store and the model's identity, before any weights load."""
    import pytest

    from otclip.engine import save_checkpoint
    from otclip.engine.errors import IndexDirectoryError
    from otclip.indexer.pipeline import index_images

    out = tmp_path / "ix"
    index_images(gallery, out, default_model, progress=False, workers=0)
    generation = json.loads((out / "manifest.json").read_text())["sides"]["images"]["generation"]
    script = (f"import sys\nfrom otclip.main import main\nmain(['index', {str(gallery)!r}, '--out', {str(out)!r}, "
              "'--no-progress'])\nprint('TORCH', 'torch' in sys.modules)")
    stdout = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "20 indexed (0 embedded, 20 unchanged" in stdout and "TORCH False" in stdout
    assert json.loads((out / "manifest.json").read_text())["sides"]["images"]["generation"] == generation

    (gallery / "chelsea.jpg").write_bytes((gallery / "rocket.jpg").read_bytes())  # known content: no embedding
    summary = index_images(gallery, out, "effnet-minilm", progress=False, workers=0)
    assert (summary.embedded, summary.duplicates, summary.model_loaded) == (0, 1, False)
    from otclip.engine.sample_photos import sample_photo

    sample_photo("astronaut").save(gallery / "new.jpg")  # new content: embedded by the index's image export
    summary = index_images(gallery, out, "effnet-minilm", progress=False, workers=0)
    assert (summary.embedded, summary.model_loaded, summary.total) == (1, False, 21)
    sample_photo("coffee").rotate(90).save(gallery / "newer.jpg")  # without exports: the model is loaded for it
    summary = index_images(gallery, out, "effnet-minilm", progress=False, workers=0, query_models=False)
    assert (summary.embedded, summary.model_loaded, summary.total) == (1, True, 22)

    other = save_checkpoint(default_model, tmp_path / "other.pt", name="other")  # same weights, another file
    with pytest.raises(IndexDirectoryError, match="refusing"):
        index_images(gallery, out, str(other), progress=False, workers=0)


def test_damaged_index_files_and_manifests_are_one_line_errors(gallery, tmp_path, default_model):
    """#13 item 7: a garbage manifest.json, a truncated .faiss, a JSONL row that is not an object and a latin-1 CSV
    are named in one line (exit 2); a damaged .faiss is rebuilt by the `reindex` the message suggests."""
    from otclip.indexer.pipeline import index_images

    out = tmp_path / "ix"
    index_images(gallery, out, default_model, progress=False, workers=0, query_models=False)
    faiss_file = next(out.glob("images-*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    code, _, stderr = otclip("search", out, "a cat")
    assert code == 2 and f"{faiss_file}: damaged" in stderr and "otclip reindex" in stderr and "Traceback" not in stderr
    assert otclip("reindex", out, "--factory", "Flat")[0] == 0
    code, stdout, _ = otclip("search", out, "a cat", "-k", "1")
    assert code == 0 and "chelsea.jpg" in stdout

    manifest = out / "manifest.json"
    for garbage, expected in (("{not json", "unreadable"), ("[1, 2]", "not an otclip manifest"), ("", "unreadable")):
        manifest.write_text(garbage)
        code, _, stderr = otclip("info", out)
        assert code == 2 and f"{manifest}:" in stderr and expected in stderr and "Traceback" not in stderr

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"path": str(gallery / "chelsea.jpg")}) + "\n[1, 2]\n")
    code, _, stderr = otclip("index", rows, "--out", tmp_path / "ix2")
    assert code == 2 and f"{rows}:2: a row must be a JSON object" in stderr
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"path,caption\n" + f"{gallery / 'chelsea.jpg'},un chat tigré\n".encode("latin-1"))
    code, _, stderr = otclip("index", latin, "--out", tmp_path / "ix3")
    assert code == 2 and f"{latin}: not UTF-8 text" in stderr and "Traceback" not in stderr
    captions = tmp_path / "captions.txt"  # a plain text corpus alike (the bare codec error had named no file)
    captions.write_bytes("a cat\nun chat tigré\n".encode("latin-1"))
    code, _, stderr = otclip("index-texts", captions, "--out", tmp_path / "ix4")
    line = stderr.strip()
    assert code == 2 and line.startswith(f"otclip index-texts: {captions}: not UTF-8 text (byte 0xe9 at offset ")
    assert line.endswith("); save it as UTF-8") and "\n" not in line


def test_a_full_disk_is_one_line_and_the_next_run_completes(gallery, tmp_path):
    """#13 item 7: indexing onto a full disk (a 256 kB tmpfs) stops with one line; with space again, the
    same command finishes the index with every file once."""
    import os

    import pytest

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        args = ("index", gallery, "--out", disk / "ix", "--no-progress", "--workers", "0", "--no-text-export")
        code, _, stderr = otclip(*args)
        assert code == 2 and "no space left on the disk" in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, stdout, stderr = otclip(*args)
        assert code == 0 and "images: 20 indexed" in stdout, stderr
        code, stdout, _ = otclip("search", disk / "ix", "a cat", "-k", "1")
        assert code == 0 and "chelsea.jpg" in stdout
    finally:
        subprocess.run(["umount", str(disk)])


def test_an_index_on_a_read_only_mount_is_searched_and_writes_are_one_line(gallery, tmp_path, default_model):
    """An index shared read-only (a read-only bind mount as root, else a folder without write permission) answers
    `search` and `check`; `index`, `reindex` and `repair` stop in one line naming the file they could not write."""
    import os

    from otclip.indexer.pipeline import index_images

    built, out = tmp_path / "built", tmp_path / "ro"
    index_images(gallery, built, default_model, progress=False, workers=0, query_models=False)
    if os.geteuid() == 0:
        out.mkdir()
        subprocess.run(["mount", "--bind", str(built), str(out)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(out)], check=True)
    else:
        out = built
        out.chmod(0o555)
    try:
        code, stdout, _ = otclip("search", out, "a cat", "-k", "1")
        assert code == 0 and "chelsea.jpg" in stdout
        assert otclip("check", out)[0] == 0
        for args in (("index", gallery, "--out", out, "--no-progress"), ("reindex", out, "--factory", "Flat"),
                     ("repair", out)):
            code, _, stderr = otclip(*args)
            assert code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
            assert f"{out / '.writer.lock'}" in stderr and ("read-only file system" in stderr
                                                             or "permission denied" in stderr), stderr
    finally:
        if out != built:
            subprocess.run(["umount", str(out)])
        built.chmod(0o755)


def test_damaged_embedding_chunks_are_found_and_their_items_embedded_again(gallery, tmp_path, default_model):
    """#13 item 5: a lost or truncated chunk is reported by `otclip check`, `reindex` refuses in one line, search
    keeps working, and `otclip index` of the same folder embeds exactly the affected items again."""
    import numpy as np

    from otclip.indexer.pipeline import index_images

    out = tmp_path / "ix"
    index_images(gallery, out, default_model, chunk_size=5, progress=False, workers=0, query_models=False)
    assert otclip("check", out)[0] == 0
    chunks = sorted((out / "embeddings").glob("*.npy"))
    assert len(chunks) == 4
    chunks[0].unlink()  # lost
    chunks[1].write_bytes(chunks[1].read_bytes()[:300])  # cut short
    code, stdout, _ = otclip("check", out)
    assert code == 1 and f"{chunks[0]}: missing" in stdout and f"{chunks[1]}: " in stdout
    assert stdout.count("(holds 5 images)") == 2
    code, _, stderr = otclip("reindex", out, "--factory", "Flat")
    assert code == 2 and "damaged chunk" in stderr and "Traceback" not in stderr
    code, stdout, _ = otclip("search", out, "a cat", "-k", "1")
    assert code == 0 and "chelsea.jpg" in stdout
    summary = index_images(gallery, out, "effnet-minilm", chunk_size=5, progress=False, workers=0)
    assert (summary.embedded, summary.repaired, summary.total) == (10, 10, 20)
    assert otclip("check", out)[0] == 0
    from otclip.engine.index_directory import IndexDirectory

    ids, vectors = IndexDirectory(out).unique_embeddings("images")
    assert len(ids) == 20 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_output_cut_short_by_a_pipe_ends_quietly(tmp_path):
    """`otclip info DIR | head -1`: a reader that closes stdout first stops the command quietly with 141 (128 +
    SIGPIPE, as cat does), not a BrokenPipeError traceback."""
    from synthetic_index import clustered, make_index

    make_index(tmp_path / "ix", clustered(50, seed=0), "Flat")
    command = subprocess.Popen([sys.executable, "-m", "otclip", "info", str(tmp_path / "ix")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    command.stdout.close()  # before it writes a line
    assert command.wait(60) == 141
    assert command.stderr.read() == b""


def test_an_index_of_a_checkpoint_given_relative_is_updated_and_searched_from_any_folder(gallery, tmp_path,
                                                                                          default_model, monkeypatch,
                                                                                          capsys):
    """`otclip index photos --out ix --model run/best.pt`: the index records the checkpoint's absolute path (it had
    recorded `run/best.pt`, which loads from no other folder); a later `otclip index` or `watch` without --model
    uses the index's model (it had refused the index, asking for --model); an index that recorded a relative path
    loads it from the index's parent folder (where --out was given from) when the current folder has no such file."""
    from otclip.engine import save_checkpoint
    from otclip.engine.search import IndexSearcher
    from otclip.indexer.pipeline import index_images
    from otclip.main import main

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = save_checkpoint(default_model, project / "run" / "best.pt", name="tuned")
    monkeypatch.chdir(project)
    index_images(gallery, "ix", "run/best.pt", progress=False, workers=0, query_models=False)
    manifest = project / "ix" / "manifest.json"
    assert json.loads(manifest.read_text())["model"]["spec"] == str(checkpoint.resolve())

    monkeypatch.chdir(elsewhere)
    (gallery / "rocket.jpg").unlink()
    assert main(["index", str(gallery), "--out", str(project / "ix"), "--no-progress", "--no-query-export"]) == 0
    assert "images: 19 indexed (0 embedded, 19 unchanged" in capsys.readouterr().out

    recorded = json.loads(manifest.read_text())
    recorded["model"]["spec"] = "run/best.pt"  # as an index made before this fix recorded it
    manifest.write_text(json.dumps(recorded))
    searcher = IndexSearcher(project / "ix")
    searcher.load_model()  # no text export: the model answers
    assert searcher.model.identity.name == "tuned@best.pt"
    assert searcher.search("a cat", "images", 1).results[0].path.endswith("chelsea.jpg")
