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
    OPQ8-IVF256-PQ8 3000 x 16 B + 16 kB + 16 kB + 1 kB = 81 kB."""
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
    assert "--max-index-memory 60 kB: no index of 3000 vectors of 16 dimensions fits" in err
    assert directory.manifest()["sides"]["images"]["factory"] == "IVF256,SQ8"  # nothing changed
    code, out, _ = cli(capsys, "reindex", directory.root, "--max-index-memory", "85K")
    assert code == 0 and "factory OPQ8,IVF256,PQ8" in out
    code, out, _ = cli(capsys, "info", directory.root, "--recall", "100")
    assert "codes re-ranked from .vectors.npy" in out and "recall@10" in out and "budget" in out
    code, out, _ = cli(capsys, "reindex", directory.root, "--max-index-memory", "0")
    assert code == 0 and "factory Flat" in out and "max_index_memory" not in directory.manifest()


def test_a_malformed_size_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reindex", str(tmp_path), "--max-index-memory", "lots"])
    assert exit_.value.code == 2 and "--max-index-memory 'lots': expected a size like 4G" in capsys.readouterr().err

