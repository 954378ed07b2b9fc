import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from otclip.training.barycenter import free_support_barycenter
from otclip.training.sinkhorn import cosine_cost, entropic_ot, sinkhorn_divergence, uniform


def clouds(n=40, m=30, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
            F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1))


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_balanced_plan_and_cost_match_pot(eps):
    x, y = clouds()
    C = cosine_cost(x, y)
    a, b = uniform(len(x), C), uniform(len(y), C)
    ours = entropic_ot(C, eps=eps, tol=1e-12, max_iter=20000)
    plan = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=20000)
    cost = ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=20000)
    assert torch.allclose(ours.plan, plan, atol=1e-5)
    assert float(ours.transport_cost) == pytest.approx(float(cost), abs=1e-5)


def test_unbalanced_plan_matches_pot():
    x, y = clouds(seed=1)
    C = cosine_cost(x, y)
    a, b = uniform(len(x), C), uniform(len(y), C)
    ours = entropic_ot(C, eps=0.05, rho=0.5, tol=1e-13, max_iter=20000)
    plan = ot.unbalanced.sinkhorn_unbalanced(a, b, C, 0.05, 0.5, stopThr=1e-14, numItermax=20000)
    assert torch.allclose(ours.plan, plan, atol=1e-5)
    assert float(ours.plan.sum()) < 1.0  # mass is allowed to leave


def test_non_uniform_marginals_are_respected():
    x, y = clouds(seed=2)
    C = cosine_cost(x, y)
    a = torch.rand(len(x), dtype=C.dtype) + 0.1
    a /= a.sum()
    plan = entropic_ot(C, a=a, eps=0.1, tol=1e-10).plan
    assert torch.allclose(plan.sum(1), a, atol=1e-8)
    assert torch.allclose(plan.sum(0), uniform(len(y), C), atol=1e-8)


def test_gradients_flow_and_pass_gradcheck():
    x, y = clouds(n=6, m=5, d=3, seed=3)
    x.requires_grad_(True)
    value = entropic_ot(cosine_cost(x, y), eps=0.1, tol=1e-13, max_iter=50000).value
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    C = cosine_cost(x.detach(), y).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: entropic_ot(c, eps=0.1, tol=1e-13, max_iter=50000).value, (C,),
                                    eps=1e-6, atol=1e-5)


def test_envelope_gradient_is_the_plan():
    x, y = clouds(seed=4)
    C = cosine_cost(x, y).requires_grad_(True)
    r = entropic_ot(C, eps=0.05, tol=1e-12, max_iter=20000)
    r.value.backward()
    assert torch.allclose(C.grad, r.plan.detach(), atol=1e-12)


def test_sinkhorn_divergence_is_zero_on_identical_sets_and_positive_otherwise():
    x, y = clouds(seed=5)
    assert float(sinkhorn_divergence(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(sinkhorn_divergence(x, y)) > 1e-3


def test_barycenter_matches_pot():
    g = torch.Generator().manual_seed(0)
    m1 = torch.randn(20, 2, generator=g, dtype=torch.float64)
    m2 = torch.randn(25, 2, generator=g, dtype=torch.float64) + 3.0
    init = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ours = free_support_barycenter([m1, m2], init, eps=0.5, n_iter=20, tol=0, inner_tol=1e-12)
    pot = ot.bregman.free_support_sinkhorn_barycenter(
        [m1.numpy(), m2.numpy()], [np.full(20, 1 / 20), np.full(25, 1 / 25)], init.numpy(), 0.5,
        weights=np.array([0.5, 0.5]), numItermax=20, numInnerItermax=100000, stopThr=0)
    np.testing.assert_allclose(ours.numpy(), pot, atol=1e-4)
