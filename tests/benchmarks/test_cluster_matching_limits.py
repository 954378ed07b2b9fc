"""The no-pairs diagnosis scores cluster maps with the fused Gromov-Wasserstein objective: checked against
POT's own loss of the map's plan; its map share, best map and purity on a hand-computed case."""

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from otclip.training.cluster_matching import ClusterProblem

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "cluster_matching_limits.py"


@pytest.fixture(scope="module")
def limits():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling partial_pairs where it runs
    try:
        spec = importlib.util.spec_from_file_location("cluster_matching_limits", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def problem(k: int, seed: int) -> ClusterProblem:
    rng = np.random.default_rng(seed)
    a = rng.random(k) + 0.2
    c1, c2 = rng.random((k, k)), rng.random((k, k))
    return ClusterProblem(torch.zeros(0), torch.zeros(0), torch.zeros(0), [], torch.zeros(0), rng.random((k, k)),
                          ((c1 + c1.T) / 2, (c2 + c2.T) / 2), a / a.sum(), np.full(k, 1 / k))


@pytest.mark.parametrize("structure", [0.0, 0.3, 1.0])
def test_fused_value_of_a_map_is_pots_loss_of_its_plan(limits, structure):
    pb = problem(5, 1)
    maps = np.array(list(itertools.permutations(range(5))), dtype=np.int8)
    values = limits.fused_values(pb, maps, structure)
    for m, value in zip(maps[::17], values[::17]):
        plan = np.zeros((5, 5))
        plan[np.arange(5), m] = pb.a
        const, h1, h2 = ot.gromov.init_matrix(*pb.layouts, plan.sum(1), plan.sum(0), "square_loss")
        expected = (1 - structure) * (pb.cross * plan).sum() + structure * ot.gromov.gwloss(const, h1, h2, plan)
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_map_share_and_best_map(limits):
    overlap = np.array([[0, 5, 1], [7, 0, 0], [0, 2, 3]])
    assert limits.map_share(overlap, np.array([1, 0, 2])) == pytest.approx(15 / 18)
    assert list(limits.best_map(overlap)) == [1, 0, 2]
    assert limits.purity(np.array(["a", "a", "b", "b", "b"]), np.array([0, 0, 0, 1, 1])) == pytest.approx(4 / 5)
