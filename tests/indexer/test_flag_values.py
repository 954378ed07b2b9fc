"""Numbers out of range are refused in one line naming the flag, before anything is read or written: argparse takes
any int or float ("nan", "inf" too), and `--batch-size -3` had indexed nothing in silence, `--batch-size 0` ended in
"range() arg 3 must not be zero", `--max-index-memory inf` in a traceback, `--lr nan` trained NaNs."""

import math
import shutil
import sqlite3

import pytest

from otclip.engine.flag_values import check_at_least, check_positive
from otclip.main import main


def test_the_checks_on_their_edges():
    for value, low in ((1, 1), (0, 0), (0.0, 0), (2.5, 1), (None, 1)):
        check_at_least("--n", value, low)
    for value, low, message in ((0, 1, "--n 0: must be at least 1"), (-1, 0, "--n -1: must not be negative"),
                                (math.nan, 0, "--n nan: expected a finite number"),
                                (math.inf, 1, "--n inf: expected a finite number"),
                                (-math.inf, 0, "--n -inf: expected a finite number")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            check_at_least("--n", value, low)
    check_positive("--lr", 1e-9)
    check_positive("--lr", None)
    for value in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"^--lr {value}: must be positive$"):
            check_positive("--lr", value)


@pytest.fixture
def small_index(tmp_path, sample_dir, default_model):
    from otclip.indexer.pipeline import index_images

    (tmp_path / "photos").mkdir()
    for name in ("chelsea.jpg", "rocket.jpg"):
        shutil.copy(sample_dir / name, tmp_path / "photos" / name)
    index_images(tmp_path / "photos", tmp_path / "ix", default_model, progress=False, workers=0, query_models=False)
    return tmp_path


def rows(index):
    with sqlite3.connect(index / "metadata.sqlite") as db:
        return db.execute("SELECT side, key, sha256 FROM items ORDER BY id").fetchall()


def test_each_command_refuses_a_number_out_of_range(small_index, capsys):
    photos, index = small_index / "photos", small_index / "ix"
    before = rows(index)
    (photos / "new.jpg").write_bytes((photos / "rocket.jpg").read_bytes()[:-10] + b"x" * 10)  # a change to index
    captions = small_index / "captions.txt"
    captions.write_text("a cat\na rocket\n")
    fresh = small_index / "fresh"
    cases = [
        (["index", photos, "--out", index, "--batch-size", "-3"], "--batch-size -3: must be at least 1"),
        (["index", photos, "--out", index, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["index", photos, "--out", index, "--workers", "-1"], "--workers -1: must not be negative"),
        (["index", photos, "--out", fresh, "--batch-size", "-3"], "--batch-size -3: must be at least 1"),
        (["index", photos, "--out", index, "--max-index-memory", "inf"], "--max-index-memory 'inf': expected a size"),
        (["index-texts", captions, "--out", index, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["watch", photos, "--out", index, "--settle", "-1"], "--settle -1: expected seconds"),
        (["watch", photos, "--out", index, "--settle", "nan"], "--settle nan: expected seconds"),
        (["search", index, "a cat", "--min-width", "-5"], "--min-width -5: must not be negative"),
        (["search", index, "a cat", "--min-height", "-1"], "--min-height -1: must not be negative"),
        (["search", index, "a cat", "--min-score", "nan"], "min score nan: expected a cosine"),
        (["info", index, "--recall", "-5"], "--recall -5: must not be negative"),
        (["demo", "--out", fresh, "--data", small_index / "data", "--fashion-mnist", "-1", "--no-serve"],
         "--fashion-mnist -1: must not be negative"),
        (["train", "--corpus", small_index / "corpus", "--out", fresh, "--lr", "nan"], "--lr nan: must be positive"),
        (["train", "--corpus", small_index / "corpus", "--out", fresh, "--reg", "ot-pairwise", "--alpha", "inf"],
         "--alpha inf: expected a finite number"),
    ]
    for args, message in cases:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # a flag's own type (--max-index-memory): argparse's usage, then the line
            code = exc.code
        out, err = capsys.readouterr()
        assert code == 2 and message in err.strip().splitlines()[-1], (args, err)
    assert rows(index) == before  # the new photo was not indexed, nothing was removed
    assert not fresh.exists() and not (small_index / "data").exists()
