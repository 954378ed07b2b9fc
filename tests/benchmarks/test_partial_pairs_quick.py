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


@pytest.mark.slow
def test_quick_mode_writes_report(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
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


def test_runs_side_by_side_give_the_runs_of_one_process_in_order(monkeypatch):
    """--workers 2 hands the runs to two spawned single-threaded processes: every run's result must be the
    one a single process with one thread computes, in the same order (linear setup, CI sizes)."""
    import argparse

    import torch

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # spawned workers import the script as a module
    import partial_pairs as pp

    args = argparse.Namespace(unpaired=[0, 200], linear_steps=(10, 20), n_test=1000, seeds=[0, 1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = pp.linear(argparse.Namespace(**vars(args), workers=1), lambda msg: None)
    finally:
        torch.set_num_threads(threads)
    side_by_side = pp.linear(argparse.Namespace(**vars(args), workers=2), lambda msg: None)
    assert side_by_side["chosen"] == alone["chosen"]
    assert side_by_side["runs"] == alone["runs"] and len(alone["runs"]) == 2 * 2 * 2 * len(pp.LINEAR_METHODS) + 8
