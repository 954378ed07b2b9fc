"""The experiment's --quick mode runs end to end and writes its JSON, Markdown and plots."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "partial_pairs.py"


def test_gap_is_a_ratio_only_where_the_oracle_leads_beyond_the_seeds_spread():
    spec = importlib.util.spec_from_file_location("partial_pairs", SCRIPT)
    pp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pp)
    assert pp.gap_closed([0.6, 0.6], [0.5, 0.5], [0.7, 0.7]) == pytest.approx(0.5)
    assert pp.gap_closed([0.4, 0.4], [0.5, 0.5], [0.7, 0.7]) == pytest.approx(-0.5)
    assert pp.gap_closed([0.6, 0.6], [0.5, 0.5], [0.5, 0.7]) is None  # gap 0.1 within the oracle's spread 0.1
    assert pp.gap_closed([0.6, 0.6], [0.5, 0.5], [0.45, 0.45]) is None  # oracle behind
    assert pp.gap_cell(None) == "n/a" and pp.gap_cell(0.25) == "+0.25"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run for the module's tests, its linear runs side by side in two processes."""
    out = tmp_path_factory.mktemp("quick")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--out", str(out),
                           "--work", str(out / "work")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_mode_writes_report(quick_run):
    tmp_path = quick_run
    results = json.loads((tmp_path / "partial_pairs-quick.json").read_text())
    methods = {r["method"] for r in results["linear"]["runs"]}
    from otclip.training.losses import REGISTRY

    categories = {m for m, spec in REGISTRY.items() if spec.needs_clusters}  # the linear setup has none
    assert categories and {"oracle", "paired-only", "mmcl-nakada (their setting)", *REGISTRY} - categories == methods
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in results["linear"]["runs"])
    assert "linear" in results["headline_gap_closed"]
    report = (tmp_path / "partial_pairs-quick.md").read_text()
    assert "| paired-only |" in report and "did not help" in report and "Goals (open world)" in report
    if "runs" in results["fashion"]:
        runs = results["fashion"]["runs"]
        assert {"zero-shot", "oracle"} <= {r["method"] for r in runs}
        assert {"open-world", "classic"} == {r["protocol"] for r in runs}
        no_pairs = {r["method"] for r in runs if r["fraction"] == 0.0}
        assert "paired-only" not in no_pairs and "ot-loop" not in no_pairs and {"ot-match", *categories} <= no_pairs
        assert (tmp_path / "partial_pairs-quick-open-world.png").stat().st_size > 1000
        assert results["plots"] == ["partial_pairs-quick-open-world.png", "partial_pairs-quick-sensitivity.png"]
        assert results["fashion"]["positives"] == "label"
        trained = [r for r in results["fashion"]["runs"] if r["method"] != "zero-shot"]
        assert all(0.0 <= r["wise_zs_unseen"] <= 1.0 for r in trained) and "After WiSE-FT" in report
    (tmp_path / "partial_pairs-quick.md").unlink()
    again = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "partial_pairs-quick.json"),
                            "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "partial_pairs-quick.md").read_text().startswith(report.split("Total time")[0])


def test_runs_side_by_side_give_the_runs_of_one_process_in_order(quick_run, monkeypatch):
    """The --quick run hands its linear runs to two spawned single-threaded processes (--workers 2): every run's
    result must be the one a single process with one thread computes, in the same order."""
    import argparse

    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import partial_pairs as pp

    side_by_side = json.loads((quick_run / "partial_pairs-quick.json").read_text())["linear"]
    assert side_by_side["workers"] == 2
    args = argparse.Namespace(workers=1)
    for grid in (pp.GRID, pp.LINEAR_GRID):  # set_quick_sizes narrows the grids in place
        for key, values in grid.items():
            monkeypatch.setitem(grid, key, values)
    pp.set_quick_sizes(args)
    assert side_by_side["recipe"]["steps"] == list(args.linear_steps) and side_by_side["n_test"] == args.n_test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pp.SideBySide(args) as runs:
            alone = json.loads(json.dumps(pp.linear(args, lambda msg: None, runs)))  # as the JSON file holds it
    finally:
        torch.set_num_threads(threads)
    assert side_by_side["chosen"] == alone["chosen"]
    assert side_by_side["runs"] == alone["runs"] and len(alone["runs"]) == 2 * 2 * len(pp.LINEAR_METHODS) + 4


def test_a_corpus_left_in_the_work_folder_with_other_sizes_is_built_again(tmp_path, monkeypatch):
    """`--quick` and full runs share the default `--work`: a quick run after a full one had used the full run's
    corpora (its figures then differed from a clean quick run's)."""
    import argparse

    from otclip.engine import fashion_mnist

    if not fashion_mnist.available():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import partial_pairs as pp

    def corpus(train: int, val: int, test: int) -> Path:
        args = argparse.Namespace(work=str(tmp_path), unseen="sandal,bag,ankle boot", train=train, val=val, test=test)
        return pp.fashion_corpus(args, "open-world", 0.1, 0)

    def rows(path: Path) -> int:  # rows with an image (a training split's unpaired texts have none)
        return sum("image" in json.loads(line) for line in path.read_text().splitlines())

    first = corpus(90, 20, 30)
    assert (rows(first / "train.jsonl"), rows(first / "val.jsonl"), rows(first / "test.jsonl")) == (90, 20, 30)
    kept = (first / "train.jsonl").stat().st_ino
    assert corpus(90, 20, 30) == first and (first / "train.jsonl").stat().st_ino == kept  # the same sizes: kept
    other = corpus(50, 10, 15)
    assert other == first and (rows(other / "train.jsonl"), rows(other / "test.jsonl")) == (50, 15)
    recorded = json.loads((other / "corpus.json").read_text())
    assert (recorded["train_size"], recorded["val_size"], recorded["test_size"]) == (50, 10, 15)
