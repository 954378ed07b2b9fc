import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from finite_differences import agreement, central_differences

from otclip.training.barycenter import free_support_barycenter
from otclip.training.sinkhorn import cosine_cost, entropic_ot, sinkhorn_divergence, uniform


def clustered(n, d=16, k=8, seed=0, spread=0.15):
    """Unit vectors around k random centres (float32, as in training)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return F.normalize(centers[torch.randint(0, k, (n,), generator=g)] + spread * torch.randn(n, d, generator=g), dim=1)


def marginal_error(plan):
    n, m = plan.shape
    return float((plan.sum(1) - 1 / n).abs().sum() + (plan.sum(0) - 1 / m).abs().sum())


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


def _generalised_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(p, p) - p * torch.log(q) - p + q).sum()


@pytest.mark.parametrize("rho", [None, 0.5])
def test_value_is_the_primal_objective_of_pots_plan(rho):
    """OT_eps = <P, C> + eps KL(P | a b^T) (+ rho KL(P 1 | a) + rho KL(P^T 1 | b)), written out by hand (float64)
    on POT's plan, with non-uniform marginals: the value is read from the potentials, not from this sum."""
    x, y = clouds(seed=5)
    C = cosine_cost(x, y)
    a = torch.rand(len(x), generator=torch.Generator().manual_seed(0), dtype=C.dtype) + 0.1
    a, b = a / a.sum(), uniform(len(y), C)
    eps = 0.05
    if rho is None:
        P = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=50000)
    else:
        P = ot.unbalanced.sinkhorn_unbalanced(a, b, C, eps, rho, stopThr=1e-15, numItermax=50000)
    objective = (P * C).sum() + eps * _generalised_kl(P, a[:, None] * b[None, :])
    if rho is not None:
        objective = objective + rho * (_generalised_kl(P.sum(1), a) + _generalised_kl(P.sum(0), b))
    ours = entropic_ot(C, a=a, eps=eps, rho=rho, tol=1e-13, max_iter=50000)
    assert float(ours.value) == pytest.approx(float(objective), abs=1e-9)
    batch = entropic_ot(torch.stack([C, C]), a=a, eps=eps, rho=rho, tol=1e-13, max_iter=50000).value
    assert batch.shape == (2,) and torch.allclose(batch, ours.value.expand(2), atol=1e-12)


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


def test_overrelaxation_takes_fewer_iterations_and_both_marginals_are_within_tol():
    C = cosine_cost(clustered(256, seed=0), clustered(256, seed=1))
    plain = entropic_ot(C, eps=0.05, tol=1e-4)
    fast = entropic_ot(C, eps=0.05, tol=1e-4, overrelax=1.5)
    assert fast.iterations < 0.75 * plain.iterations
    assert marginal_error(plain.plan) < 1e-4 and marginal_error(fast.plan) < 1e-4  # columns too, not only rows
    assert float((fast.plan - plain.plan).abs().sum()) < 1e-3


def test_stopping_at_max_iter_is_not_silent():
    C = cosine_cost(clustered(128, seed=2), clustered(128, seed=3))
    with pytest.warns(RuntimeWarning, match="max_iter=20"):
        r = entropic_ot(C, eps=0.01, tol=1e-6, max_iter=20)
    assert not r.converged and r.marginal_error > 1e-6


def test_small_eps_with_far_columns_falls_back_to_log_domain_and_matches_pot():
    g = torch.Generator().manual_seed(4)
    x, y = (F.normalize(torch.randn(256, 64, generator=g), dim=1) for _ in range(2))
    C = cosine_cost(x, y)
    C[:, :4] += 3.0  # texts far from every image: their kernel columns underflow in float32
    ours = entropic_ot(C, eps=0.005, tol=1e-5, max_iter=20000)
    a = torch.full((256,), 1 / 256, dtype=torch.float64)
    pot = ot.bregman.sinkhorn_log(a, a, C.double(), 0.005, stopThr=1e-7, numItermax=4000)
    assert ours.converged and torch.isfinite(ours.plan).all()
    assert float((ours.plan.double() - pot).abs().sum()) < 1e-4


def test_autocast_bf16_never_reaches_the_solver():
    from otclip.training.losses import step_ot

    x, y = clustered(256, seed=5), clustered(256, seed=6)
    reference = step_ot(cosine_cost(x, y), 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        C = cosine_cost(x, y)
        under = step_ot(C, 0.05)
    assert C.dtype == torch.float32 and under.plan.dtype == torch.float32
    assert float((under.plan - reference.plan).abs().sum()) < 1e-5
    assert float(under.value) == pytest.approx(float(reference.value), abs=1e-6)


@pytest.mark.parametrize("rho", [None, 0.5])
def test_plan_gradient_matches_finite_differences_of_resolved_plans(rho):
    """d<W, P*(C)>/dC by implicit differentiation against central differences, each plan solved anew."""
    x, y = clouds(n=9, m=7, d=4, seed=6)
    C = cosine_cost(x, y)
    W = torch.randn(C.shape, generator=torch.Generator().manual_seed(1), dtype=C.dtype)

    def objective(c):
        return (W * entropic_ot(c, eps=0.1, rho=rho, tol=1e-14, max_iter=200000).plan).sum()

    Cg = C.clone().requires_grad_(True)
    objective(Cg).backward()
    cosine, ratio = agreement(Cg.grad, central_differences(objective, C))
    assert cosine > 0.99999 and ratio == pytest.approx(1.0, abs=1e-4)


def test_debiased_barycenter_is_a_stationary_point_of_the_debiased_objective():
    """Autograd of sum_m w_m S_eps(mu_m, Y) w.r.t. the support, at the returned Y against the start."""
    from otclip.training.sinkhorn import sqeuclidean_cost

    g = torch.Generator().manual_seed(1)
    m1 = torch.randn(20, 2, generator=g, dtype=torch.float64)
    m2 = torch.randn(25, 2, generator=g, dtype=torch.float64) + 3.0
    init = torch.randn(12, 2, generator=g, dtype=torch.float64)

    def gradient_norm(Y):
        Y = Y.clone().requires_grad_(True)
        value = sum(0.5 * sinkhorn_divergence(Y, m, eps=1.0, cost=sqeuclidean_cost, tol=1e-12) for m in (m1, m2))
        value.backward()
        return float(Y.grad.norm())

    Y = free_support_barycenter([m1, m2], init, eps=1.0, n_iter=200, tol=1e-20, inner_tol=1e-10, debiased=True)
    plain = free_support_barycenter([m1, m2], init, eps=1.0, n_iter=200, tol=1e-20, inner_tol=1e-10)
    assert gradient_norm(Y) < 1e-4 * gradient_norm(init) < 1e-2 * gradient_norm(plain)
    same = free_support_barycenter([m1, m1], m1, eps=0.5, n_iter=5, inner_tol=1e-12, debiased=True)
    assert torch.allclose(same, m1, atol=1e-8)  # a measure is its own debiased barycenter


@pytest.mark.parametrize("n,m,eps,rho", [(40, 25, 0.05, None), (25, 40, 0.05, None), (48, 48, 0.01, None),
                                         (35, 20, 0.05, 0.5), (20, 35, 0.02, 0.5)])
@pytest.mark.parametrize("dense", [False, True])
def test_implicit_backward_solves_the_whole_linearised_system(n, m, eps, rho, dense, monkeypatch):
    """The plan's backward (CG on the smaller side's Schur complement, or the dense fallback when CG stalls) against
    the least-squares solution of the whole (n + m) system H [w1; w2] = [u; v] by numpy."""
    from otclip.training import sinkhorn

    if dense:
        monkeypatch.setattr(sinkhorn, "_conjugate_gradients", lambda *args, **kwargs: None)
    x, y = clustered(n, d=8, seed=3).double(), clustered(m, d=8, seed=4).double()
    C = cosine_cost(x, y).requires_grad_(True)
    plan = entropic_ot(C, eps=eps, rho=rho, tol=1e-12, max_iter=200000).plan
    G = torch.randn(n, m, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (plan * G).sum().backward()

    P, Gn = plan.detach().numpy(), G.numpy()
    tau = 1.0 if rho is None else rho / (rho + eps)
    H = np.block([[np.diag(P.sum(1)), tau * P], [tau * P.T, np.diag(P.sum(0))]])
    w = np.linalg.lstsq(H, np.concatenate([(Gn * P).sum(1), (Gn * P).sum(0)]), rcond=1e-13)[0]
    expected = P * (tau * (w[:n, None] + w[None, n:]) - Gn) / eps
    assert np.linalg.norm(C.grad.numpy() - expected) < 1e-6 * np.linalg.norm(expected)


@pytest.mark.parametrize("rho", [None, 0.5])
def test_a_batch_of_problems_is_solved_as_each_alone_and_as_pot(rho):
    """Three problems of one shape solved as one batch: each value, plan and envelope gradient as solving it alone,
    each plan as POT's (log-domain Sinkhorn, unbalanced for rho)."""
    costs = [cosine_cost(*clouds(n=30, m=20, seed=s)) for s in (1, 2, 3)]
    costs[2] = costs[2] * 3.0  # another scale: converges at another pace
    batch = torch.stack(costs).requires_grad_(True)
    together = entropic_ot(batch, eps=0.05, rho=rho, tol=1e-10, max_iter=100000)
    assert together.value.shape == (3,)
    together.value.sum().backward()
    a, b = uniform(30, costs[0]), uniform(20, costs[0])
    for k, C in enumerate(costs):
        Ck = C.clone().requires_grad_(True)
        alone = entropic_ot(Ck, eps=0.05, rho=rho, tol=1e-10, max_iter=100000)
        alone.value.backward()
        assert float(together.value[k]) == pytest.approx(float(alone.value), abs=1e-8)
        assert torch.allclose(together.plan[k], alone.plan, atol=1e-9)
        assert torch.allclose(batch.grad[k], Ck.grad, atol=1e-9)
        if rho is None:
            ref = ot.sinkhorn(a, b, C, 0.05, method="sinkhorn_log", stopThr=1e-12, numItermax=100000)
        else:
            ref = ot.unbalanced.sinkhorn_unbalanced(a, b, C, 0.05, rho, stopThr=1e-14, numItermax=20000)
        assert torch.allclose(together.plan[k].detach(), ref, atol=1e-6)


def test_a_batch_whose_kernel_underflows_finishes_in_the_log_domain(monkeypatch):
    """Far columns in one problem of a float32 batch (their kernel underflows): the batch falls back to log-sum-exp
    iterations and still matches each problem solved alone, and POT's log-domain solver."""
    x, y = clouds(n=64, m=64, seed=7, dtype=torch.float32)
    far = cosine_cost(x, y)
    far[:, :3] += 3.0
    batch = torch.stack([cosine_cost(x, y), far])
    from otclip.training import sinkhorn

    log_domain = sinkhorn._log_domain_potentials
    calls = []
    monkeypatch.setattr(sinkhorn, "_log_domain_potentials", lambda *args: calls.append(1) or log_domain(*args))
    together = entropic_ot(batch, eps=0.01, tol=1e-5, max_iter=20000)
    assert calls and together.converged and torch.isfinite(together.plan).all()
    a = torch.full((64,), 1 / 64, dtype=torch.float64)
    for k in range(2):
        alone = entropic_ot(batch[k], eps=0.01, tol=1e-5, max_iter=20000)
        assert float((together.plan[k] - alone.plan).abs().sum()) < 2e-5
        pot = ot.bregman.sinkhorn_log(a, a, batch[k].double(), 0.01, stopThr=1e-9, numItermax=20000)
        assert float((together.plan[k].double() - pot).abs().sum()) < 1e-4


@pytest.mark.parametrize("cost_name", ["cosine_cost", "sqeuclidean_cost"])
def test_a_set_against_itself_has_the_gradient_of_two_sets(cost_name):
    """cost(x, x) goes through the one-product Gram backward: its gradient against central differences and against
    autograd's own two-product backward of cost(x, copy of x)."""
    from otclip.training import sinkhorn

    cost = getattr(sinkhorn, cost_name)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W = torch.randn(7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def objective(z):
        return (W * cost(z, z)).sum()

    xs = x.clone().requires_grad_(True)
    objective(xs).backward()
    cosine, ratio = agreement(xs.grad, central_differences(objective, x))
    assert cosine > 0.999999 and ratio == pytest.approx(1.0, abs=1e-6)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (W * cost(xa, xb)).sum().backward()
    assert torch.allclose(xs.grad, xa.grad + xb.grad, atol=1e-12)


@pytest.mark.parametrize("n,m,eps,rho", [(300, 120, 0.05, None), (120, 300, 0.02, None), (200, 200, 0.05, 0.5)])
def test_float32_implicit_backward_agrees_with_the_float64_linear_system(n, m, eps, rho, monkeypatch):
    """A float32 plan is differentiated in float32 on the CPU: dL/dC against the float64 least-squares solution of the
    whole (n + m) system by numpy, to 1e-4; and when float32 CG stalls, the float64 path gives the same."""
    from otclip.training import sinkhorn

    x, y = clustered(n, d=16, seed=8), clustered(m, d=16, seed=9)
    C = cosine_cost(x, y).requires_grad_(True)
    plan = entropic_ot(C, eps=eps, rho=rho, tol=1e-6, max_iter=20000).plan
    assert plan.dtype == torch.float32
    G = torch.randn(n, m, generator=torch.Generator().manual_seed(5))
    (plan * G).sum().backward()

    P, Gn = plan.detach().double().numpy(), G.double().numpy()
    tau = 1.0 if rho is None else rho / (rho + eps)
    H = np.block([[np.diag(P.sum(1)), tau * P], [tau * P.T, np.diag(P.sum(0))]])
    w = np.linalg.lstsq(H, np.concatenate([(Gn * P).sum(1), (Gn * P).sum(0)]), rcond=1e-13)[0]
    expected = P * (tau * (w[:n, None] + w[None, n:]) - Gn) / eps
    assert np.linalg.norm(C.grad.double().numpy() - expected) < 1e-4 * np.linalg.norm(expected)

    cg = sinkhorn._conjugate_gradients
    monkeypatch.setattr(sinkhorn, "_conjugate_gradients",
                        lambda op, b, *args: None if b.dtype == torch.float32 else cg(op, b, *args))
    fallback = sinkhorn._plan_backward(plan.detach(), G, eps, tau)
    assert np.linalg.norm(fallback.double().numpy() - expected) < 1e-5 * np.linalg.norm(expected)


def test_auto_overrelaxation_is_plain_on_easy_problems_and_faster_on_slow_ones():
    """'auto': the same plan as POT's within tol, both marginals within tol; no more iterations than plain updates
    where those end quickly (eps 0.2), fewer than the fixed factor 1.5 where they are slow (1024 images against 256 of
    them at eps 0.05: plain 303 iterations, 1.5 120)."""
    easy = cosine_cost(clustered(256, seed=0), clustered(256, seed=1))
    plain, fixed, auto = (entropic_ot(easy, eps=0.2, tol=1e-4, overrelax=o) for o in (1.0, 1.5, "auto"))
    assert auto.iterations <= plain.iterations < fixed.iterations
    x = clustered(1024, d=64, k=10, seed=2, spread=0.1)
    slow = cosine_cost(x, x[:256])
    fixed, auto = (entropic_ot(slow, eps=0.05, tol=1e-4, max_iter=5000, overrelax=o) for o in (1.5, "auto"))
    assert auto.converged and auto.iterations < 0.6 * fixed.iterations
    a, b = uniform(1024, slow).double(), uniform(256, slow).double()
    pot = ot.sinkhorn(a, b, slow.double(), 0.05, method="sinkhorn_log", stopThr=1e-10, numItermax=100000)
    n, m = slow.shape
    assert float((auto.plan.sum(1) - 1 / n).abs().sum() + (auto.plan.sum(0) - 1 / m).abs().sum()) < 1e-4
    assert float((auto.plan.double() - pot).abs().sum()) < 2e-3
