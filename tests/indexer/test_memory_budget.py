"""`--max-index-memory` (#12) from the CLI: `auto` picks the most accurate index that fits, the index keeps the
budget for later runs, a budget nothing fits is one line that changes nothing, and `otclip info` reports the
index's size and its measured recall."""

from __future__ import annotations

import json

import pytest
from synthetic_index import clustered, make_index

from otclip.main import main


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_budget_picks_the_index_and_stays_with_it(tmp_path, capsys):
    """3000 x 16-d, hand-computed: Flat 192 kB, IVF256-Flat 232 kB, IVF256-SQ8 3000 x 24 B + 256 x 64 B = 88 kB,
    SQ6 3000 x 20 B + 16 kB = 76 kB, SQ4 3000 x 16 B + 16 kB = 64 kB, the smallest: at 16-d no PQ code is
    smaller than SQ4's 8 bytes (the PQ picks: test_faiss_indexes)."""
    directory = make_index(tmp_path / "ix", clustered(3000, 0), "auto")
    assert directory.manifest()["sides"]["images"]["factory"] == "Flat"
    code, out, _ = cli(capsys, "reindex", directory.root, "--max-index-memory", "100K")
    assert code == 0 and "factory IVF256,SQ8" in out
    code, out, _ = cli(capsys, "info", directory.root, "--recall", "200", "--json")
    side = json.loads(out)["sides"]["images"]
    assert side["reranked"] and 0.9 <= side["recall@10"] <= 1 and side["index_bytes"] <= 100_000
    assert json.loads(out)["max_index_memory"] == 100_000
    directory.publish("images", "auto")  # a later run (`otclip index` publishes with auto) keeps to the budget
    assert directory.manifest()["sides"]["images"]["factory"] == "IVF256,SQ8"

    code, out, err = cli(capsys, "reindex", directory.root, "--max-index-memory", "60K")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--max-index-memory 60 kB: no index of 3000 vectors of 16 dimensions fits; the smallest, IVF256,SQ4, " \
           "takes 64.4 kB" in err
    assert directory.manifest()["sides"]["images"]["factory"] == "IVF256,SQ8"  # nothing changed,
    assert directory.manifest()["max_index_memory"] == 100_000  # the refused budget included
    code, out, _ = cli(capsys, "info", directory.root, "--recall", "100")
    assert "codes re-ranked from .vectors.npy" in out and "recall@10" in out and "budget" in out
    code, out, _ = cli(capsys, "reindex", directory.root, "--max-index-memory", "0")
    assert code == 0 and "factory Flat" in out and "max_index_memory" not in directory.manifest()


def test_a_malformed_size_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reindex", str(tmp_path), "--max-index-memory", "lots"])
    assert exit_.value.code == 2 and "--max-index-memory 'lots': expected a size like 4G" in capsys.readouterr().err



def test_index_takes_a_budget_and_later_runs_keep_it(tmp_path, sample_dir, capsys):
    """`otclip index --max-index-memory` on 8 photos (Flat: 8 x 384 x 4 B = 12.3 kB; every other kind is
    bigger at this size: centroids, codebooks): kept for the next run without the flag (nothing rebuilt); a
    budget nothing fits is one line that keeps the index and the budget; `0` removes it."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(sample_dir.glob("*.jpg"))[:8]:
        shutil.copy(path, photos / path.name)
    out = tmp_path / "ix"
    common = ["--out", out, "--no-progress", "--no-text-export", "--workers", "0"]

    def manifest() -> dict:
        return json.loads((out / "manifest.json").read_text())

    assert cli(capsys, "index", photos, *common, "--max-index-memory", "13K")[0] == 0
    side = manifest()["sides"]["images"]
    assert side["factory"] == "Flat" and side["max_index_memory"] == 13_000 and side["index_bytes"] < 13_000
    assert cli(capsys, "index", photos, *common)[0] == 0
    assert manifest()["sides"]["images"] == side and manifest()["max_index_memory"] == 13_000
    code, _, err = cli(capsys, "index", photos, *common, "--max-index-memory", "1K")
    assert code == 2 and "no index of 8 vectors" in err and len(err.strip().splitlines()) == 1
    assert manifest()["sides"]["images"] == side and manifest()["max_index_memory"] == 13_000
    assert cli(capsys, "index", photos, *common, "--max-index-memory", "0")[0] == 0
    assert manifest()["sides"]["images"]["max_index_memory"] is None and "max_index_memory" not in manifest()
