"""`otclip search` with the query language, filters, pages, date order, export (#11); EXIF dates at index time."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from otclip.indexer.pipeline import index_images
from otclip.main import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos_index(tmp_path_factory, sample_dir, default_model):
    """6 photos in two folders, a manifest column `trip`, two of them with an EXIF date."""
    root = tmp_path_factory.mktemp("search-cli")
    rows = []
    for folder, names in (("2023", ["chelsea", "rocket", "coffee"]), ("2024", ["astronaut", "horse", "camera"])):
        (root / folder).mkdir()
        for name in names:
            rows.append(f"{folder}/{name}.jpg,{'alps' if name in ('horse', 'coffee') else 'home'}")
            target = root / folder / f"{name}.jpg"
            image = Image.open(sample_dir / f"{name}.jpg")
            exif = image.getexif()
            if name == "chelsea":
                exif.get_ifd(0x8769)[0x9003] = "2019:05:04 10:00:00"
            elif name == "rocket":
                exif.get_ifd(0x8769)[0x9003] = "2021:08:01 18:30:00"
            image.save(target, exif=exif)
            os.utime(target, (datetime.datetime(2024, 1, 1).timestamp(),) * 2)  # the others' date: their mtime
    (root / "photos.csv").write_text("path,trip\n" + "\n".join(rows) + "\n")
    index_images(root / "photos.csv", root / "ix", default_model, progress=False, workers=0, query_models=False)
    return root


def results(out: str) -> list[dict]:
    return json.loads(out)


def test_exif_dates_are_read_at_index_time(photos_index, capsys):
    code, out, _ = run(capsys, "search", photos_index / "ix", "a photo", "-k", "6", "--json")
    taken = {os.path.basename(r["path"]): r["taken"] for r in results(out)}
    assert taken["chelsea.jpg"] == datetime.datetime(2019, 5, 4, 10).timestamp()
    assert taken["rocket.jpg"] == datetime.datetime(2021, 8, 1, 18, 30).timestamp()
    assert taken["horse.jpg"] == datetime.datetime(2024, 1, 1).timestamp()


def test_query_language_filters_and_order_from_the_cli(photos_index, capsys):
    ix = photos_index / "ix"
    code, out, _ = run(capsys, "search", ix, "a cat - an animal", "-k", "1", "--json")
    assert code == 0
    code, out, _ = run(capsys, "search", ix, f"{photos_index / '2023' / 'rocket.jpg'} + a launch pad", "-k", "1", "--json")
    assert results(out)[0]["path"].endswith("rocket.jpg")
    code, out, _ = run(capsys, "search", ix, "a cat", "--under", photos_index / "2024", "-k", "6", "--json")
    assert {os.path.basename(r["path"]) for r in results(out)} == {"astronaut.jpg", "horse.jpg", "camera.jpg"}
    code, out, _ = run(capsys, "search", ix, "a cat", "--where", "trip=alps", "--json")
    assert {os.path.basename(r["path"]) for r in results(out)} == {"horse.jpg", "coffee.jpg"}
    code, out, _ = run(capsys, "search", ix, "a cat", "--before", "2022-01-01", "--order", "date", "--json")
    assert [os.path.basename(r["path"]) for r in results(out)] == ["rocket.jpg", "chelsea.jpg"]
    code, out, err = run(capsys, "search", ix, "a cat", "-k", "2")
    assert "more: --offset 2" in err
    code, out, _ = run(capsys, "search", ix, "a cat", "-k", "2", "--offset", "5")
    assert len(out.strip().splitlines()) == 1 and out.split()[0] == "6"


def test_export_links_or_copies_the_results(photos_index, tmp_path, capsys):
    ix = photos_index / "ix"
    code, out, err = run(capsys, "search", ix, "a cat", "-k", "3", "--export", tmp_path / "picked", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and "exported 3 of 3 results" in err and [r["rank"] for r in rows] == ["1", "2", "3"]
    linked = sorted((tmp_path / "picked").glob("0*"))
    assert [p.name[:5] for p in linked] == ["0001-", "0002-", "0003-"] and all(p.is_symlink() for p in linked)
    assert linked[0].resolve() == Path(rows[0]["path"]).resolve()
    assert (tmp_path / "picked" / "results.csv").read_text() == out
    run(capsys, "search", ix, "a rocket", "-k", "1", "--export", tmp_path / "copied", "--copy")
    copied = next((tmp_path / "copied").glob("0001-*"))
    assert not copied.is_symlink() and copied.name.endswith("rocket.jpg")
    shutil.rmtree(tmp_path / "copied")


@pytest.mark.parametrize("args,message", [
    (["a cat + "], "with no term"), (["./missing.jpg + cat"], "no such file"), (["a cat", "--where", "trip"], "COLUMN="),
    (["a cat", "--after", "yesterday"], "--after 'yesterday'"), (["a cat", "--collapse", "2"], "collapse"),
    ([], "give a query"), (["--image", "https://example.com/cat.jpg"], "is a URL: otclip reads images from files"),
    (["HTTPS://example.com/cat.jpg + a cat"], "is a URL"),
])
def test_bad_searches_are_one_line(photos_index, capsys, args, message):
    code, _, err = run(capsys, "search", photos_index / "ix", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_names_and_captions_print_one_line_each(sample_dir, default_model, tmp_path, capsys):
    """A filename may hold a newline or a terminal escape, a caption a line break: the table printed them raw (one
    result over two lines; a name that recoloured the terminal). Now escaped as Python writes them; --json keeps them.
    `rank` lists a folder as `index` does: the index directory inside it (its thumbnails) is not ranked."""
    from otclip.engine.terminal_text import one_line

    for c in [*map(chr, range(0x20)), "\x7f", "\x85", "\x9b", "\u2028", "\u2029"]:
        assert one_line(f"a{c}b") == repr(f"a{c}b")[1:-1]  # Python's own escapes as the reference
    assert one_line("café 猫 \\ ok") == "café 猫 \\ ok"
    name = "cat\nevil\x1b[31m.jpg"
    shutil.copy(sample_dir / "chelsea.jpg", tmp_path / name)
    (tmp_path / "m.csv").write_text(f'path,caption\n"{name}","a cat\non two lines"\n')
    index_images(tmp_path / "m.csv", tmp_path / "ix", default_model, progress=False, workers=0, query_models=False)
    code, out, _ = run(capsys, "search", tmp_path / "ix", "a cat")
    assert code == 0 and len(out.splitlines()) == 1 and "\x1b" not in out
    assert out.rstrip().endswith("cat\\nevil\\x1b[31m.jpg  (a cat\\non two lines)")
    code, out, _ = run(capsys, "search", tmp_path / "ix", "a cat", "--json")
    assert results(out)[0]["path"].endswith(name) and results(out)[0]["text"] == "a cat\non two lines"
    (tmp_path / "m.csv").unlink()
    code, out, _ = run(capsys, "rank", "a cat", "--images", tmp_path)
    assert code == 0 and out.splitlines()[1].endswith("cat\\nevil\\x1b[31m.jpg") and len(out.splitlines()) == 2
