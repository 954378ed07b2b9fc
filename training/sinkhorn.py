"""Entropic optimal transport between two weighted point clouds, for use inside a training step.

Problem (balanced):     OT_eps(a, b; C) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> + eps KL(P | a b^T)
Problem (unbalanced):   OT_eps,rho(a, b; C) = min_{P >= 0}  <P, C> + eps KL(P | a b^T)
                                                  + rho KL(P 1 | a) + rho KL(P^T 1 | b)
Solution: P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), with Sinkhorn's alternating updates
    f_i = -tau eps log sum_j b_j exp((g_j - C_ij) / eps),   g likewise,   tau = rho / (rho + eps)
(tau = 1 when balanced). References: Cuturi 2013 (Sinkhorn distances); Chizat, Peyre, Schmitzer,
Vialard 2018 (scaling algorithms for unbalanced OT); Schmitzer 2019 (stabilised scaling);
Feydy et al. 2019 (Sinkhorn divergences). POT's `ot.sinkhorn` / `ot.unbalanced.sinkhorn_unbalanced`
solve the same problems and are the reference in the tests.

Speed, since OT runs every training step: the iterations are matrix-vector products on the
kernel K = exp((f + g - C) / eps) (scaling form), stabilised by absorbing large scalings into the
log-potentials f, g (Schmitzer), over-relaxed when asked (Thibault et al. 2021); they stop as soon
as both marginals are within `tol` (L1). Where the scaling form under- or overflows (small eps,
outliers), the same fixed point is reached by log-domain (log-sum-exp) iterations, as POT's
`sinkhorn_log`. Everything runs in at least float32, also under autocast: bf16 plans are
percents of the mass off. A batch of problems of one shape (..., n, m) is solved in one loop (one set of
kernel launches for all, which is what a GPU step is bound by).

Gradients: the value's gradient is the plan (envelope theorem: d OT / d C = P*), so nothing
backpropagates through the iterations; the plan's own gradient, for terms that are functions of
plans (loop consistency), comes from implicit differentiation of the fixed point (`ImplicitPlan`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

ABSORB_ABOVE = 1e4  # scalings larger than this are folded into the potentials


@dataclass
class OTResult:
    value: torch.Tensor  # OT_eps (entropic objective); gradient w.r.t. C is the plan (envelope theorem)
    plan: torch.Tensor  # (n, m) optimal plan; its gradient w.r.t. C is the implicit derivative of the fixed point
    transport_cost: torch.Tensor  # <P, C>, the quantity POT's sinkhorn2 returns
    iterations: int
    marginal_error: float
    converged: bool = True


def uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def _ot_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower (bf16, fp16) is solved in float32."""
    return torch.promote_types(t.dtype, torch.float32)


def _log_domain_potentials(C, a, b, eps, tau, f, g, max_iter, tol, check_every, first_iter):
    """Sinkhorn's updates written with log-sum-exp (no kernel to under- or overflow), from (f, g).
    Balanced: the error is the row marginal's L1 error (columns are exact after each g-update);
    unbalanced: the largest change of f / eps."""
    log_a, log_b = torch.log(a), torch.log(b)
    err, it = math.inf, first_iter
    for it in range(first_iter + 1, max_iter + 1):
        f_prev = f
        f = -tau * eps * torch.logsumexp(log_b[..., None, :] + (g[..., None, :] - C) / eps, dim=-1)
        g = -tau * eps * torch.logsumexp(log_a[..., :, None] + (f[..., :, None] - C) / eps, dim=-2)
        if it % check_every and it != max_iter:
            continue
        if tau == 1.0:
            rows = torch.exp(log_a + (f + eps * torch.logsumexp(log_b[..., None, :] + (g[..., None, :] - C) / eps, dim=-1)) / eps)
            err = float((rows - a).abs().sum(-1).max())
        else:
            err = float((f - f_prev).abs().max()) / eps
        if err < tol:
            break
    return f, g, it, err


def _kernel(C, f, g, a, b, eps):
    """a_i b_j exp((f_i + g_j - C_ij) / eps), for one problem (n, m) or a batch (..., n, m)."""
    return torch.exp((f[..., :, None] + g[..., None, :] - C) / eps) * a[..., :, None] * b[..., None, :]


def _rows(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K v, for one problem or a batch (as row vectors times K^T: a batched matrix times a column vector is 7x
    slower on the CPU, 4.2 ms against 0.6 for 5 problems of 1024 x 1024)."""
    return K @ v if K.dim() == 2 else (v.unsqueeze(-2) @ K.mT).squeeze(-2)


def _columns(K: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """K^T u, for one problem or a batch."""
    return K.T @ u if K.dim() == 2 else (u.unsqueeze(-2) @ K).squeeze(-2)


@torch.no_grad()
def sinkhorn_potentials(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, rho: float | None = None,
    max_iter: int = 1000, tol: float = 1e-6, check_every: int = 5, overrelax: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Optimal log-potentials (f, g) of the entropic (un)balanced problem; also iterations and error.

    Balanced: the error is the L1 distance of the plan's row marginal to `a` plus its column
    marginal's to `b` (over-relaxed updates leave both inexact). Unbalanced: the largest relative
    change of the scalings. Falls back to log-domain iterations if the scaling form leaves the
    floating-point range. C may hold a batch of problems (..., n, m), solved together until the worst
    one is within `tol`: one set of kernel launches for all (what a GPU step needs), the same flops.
    """
    tau = 1.0 if rho is None else rho / (rho + eps)
    f = C.min(dim=-1).values  # a shift that keeps the first kernel from underflowing
    g = C.new_zeros(C.shape[:-2] + C.shape[-1:])
    u, v = torch.ones_like(f), torch.ones_like(g)
    K = _kernel(C, f, g, a, b, eps)
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        u_prev = u
        if tau == 1.0 and overrelax != 1.0:  # over-relaxed scaling (Thibault et al. 2021): same fixed point
            u = u ** (1 - overrelax) * (a / _rows(K, v)) ** overrelax
            v = v ** (1 - overrelax) * (b / _columns(K, u)) ** overrelax
        elif tau == 1.0:
            u = a / _rows(K, v)
            v = b / _columns(K, u)
        else:  # the fixed point is f = tau F(g): potentials already absorbed into K must be discounted
            u = (a / _rows(K, v)) ** tau * torch.exp((tau - 1.0) * f / eps)
            v = (b / _columns(K, u)) ** tau * torch.exp((tau - 1.0) * g / eps)
        if it % check_every and it != max_iter:
            continue  # host synchronisation (costly on a GPU) only every `check_every` iterations
        if rho is None:  # the worst problem of a batch
            error = ((u * _rows(K, v) - a).abs().sum(-1) + (v * _columns(K, u) - b).abs().sum(-1)).max()
        else:
            error = ((u - u_prev).abs().amax(-1) / u.abs().amax(-1).clamp_min(1.0)).max()
        largest = torch.maximum(u.max(), v.max())
        smallest = torch.minimum(u.min(), v.min())
        err, largest, smallest = (float(t) for t in torch.stack([error, largest, smallest]).tolist())
        if not (math.isfinite(err) and math.isfinite(largest)) or smallest <= 0.0:
            # the kernel under- or overflowed: finish from the last absorbed (finite) potentials in the log domain
            return _log_domain_potentials(C, a, b, eps, tau, f, g, max_iter, tol, check_every, it)
        if err < tol:
            break
        if largest > ABSORB_ABOVE:
            f, g = f + eps * torch.log(u), g + eps * torch.log(v)
            u, v = torch.ones_like(u), torch.ones_like(v)
            K = _kernel(C, f, g, a, b, eps)
    return f + eps * torch.log(u), g + eps * torch.log(v), it, err


CG_TOL = 1e-9  # relative residual of the implicit-gradient solve (float64)


def _schur_solve(P: torch.Tensor, u: torch.Tensor, v: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[w1; w2] with H [w1; w2] = [u; v], H = [[diag alpha, tau P], [tau P^T, diag beta]], alpha = P 1, beta = P^T 1,
    through the Schur complement on the columns: S w2 = v - tau P^T (u / alpha), S = diag beta - tau^2 P^T diag(1/alpha) P,
    then w1 = (u - tau P w2) / alpha. S is never formed: conjugate gradients with S's diagonal as preconditioner,
    two matrix-vector products with P an iteration: on the CPU a (m x m) float64 factorisation took half an
    ot-loop step at batch 1024 (218 ms a step with it, 171 with CG, which converges in 7-25 iterations there,
    40-60 at eps 0.005). On a GPU the dense float64 solve is the faster one (H100: 50 ms a step against 71:
    CG's many small kernels and checks), so it is used there, and wherever CG stalls. Balanced (tau = 1), S is
    singular along 1 (f + t, g - t is the same plan) and the right-hand side orthogonal to it: S + 1 1^T is
    solved instead (Luise et al. 2018)."""
    alpha, beta = P.sum(1), P.sum(0)
    shift = 1.0 if tau == 1.0 else 0.0

    def schur(w: torch.Tensor) -> torch.Tensor:
        return beta * w - tau * tau * (P.T @ ((P @ w) / alpha)) + shift * w.sum()

    rhs = v - tau * (P.T @ (u / alpha))
    w2 = None
    if not P.is_cuda:
        diag = beta - tau * tau * ((P * P) / alpha[:, None]).sum(0) + shift
        w2 = _conjugate_gradients(schur, rhs, diag.clamp_min(beta.min() * 1e-3))
    if w2 is None:
        dense = torch.diag(beta) - tau * tau * (P.T / alpha[None, :]) @ P + shift
        w2 = torch.linalg.solve(dense, rhs)
    return (u - tau * (P @ w2)) / alpha, w2


def _conjugate_gradients(op, b: torch.Tensor, diag: torch.Tensor, tol: float = CG_TOL,
                         max_iter: int = 500) -> torch.Tensor | None:
    """Preconditioned CG for a symmetric positive definite `op`; None if it has not converged."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / diag
    p = z.clone()
    rz = r @ z
    bound = tol * float(b.norm())
    if bound == 0.0:
        return x
    for it in range(max_iter):
        Ap = op(p)
        step = rz / (p @ Ap)
        x = x + step * p
        r = r - step * Ap
        if it % 4 == 3 and float(r.norm()) < bound:  # a host synchronisation every 4 iterations
            return x
        z = r / diag
        rz_next = r @ z
        p = z + (rz_next / rz) * p
        rz = rz_next
    return None


class ImplicitPlan(torch.autograd.Function):
    """The optimal plan P*(C) with the gradient of the fixed point (implicit function theorem).

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) with f = tau F(g), g = tau G(f) (Sinkhorn's
    fixed point; tau = rho / (rho + eps), 1 when balanced). Differentiating the fixed point gives
        alpha_i df_i + tau (P dg)_i = tau ((P o dC) 1)_i,    beta_j dg_j + tau (P^T df)_j = tau ((P o dC)^T 1)_j,
    alpha = P 1, beta = P^T 1, i.e. H [df; dg] = tau [r; c] with H = [[diag alpha, tau P], [tau P^T, diag beta]].
    For an upstream gradient G = dL/dP, with u = (G o P) 1, v = (G o P)^T 1 and H [w1; w2] = [u; v]:
        dL/dC = (P o (tau (w1_i + w2_j) - G_ij)) / eps.
    The system is solved on the smaller side (`_schur_solve`, the roles of rows and columns swapped when the
    plan has fewer rows), in float64 (Eisenberger et al. 2022 derive the same backward).
    """

    @staticmethod
    def forward(ctx, C: torch.Tensor, plan: torch.Tensor, eps: float, tau: float) -> torch.Tensor:
        ctx.save_for_backward(plan)
        ctx.eps, ctx.tau = eps, tau
        return plan.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (plan,) = ctx.saved_tensors
        return _plan_backward(plan, grad, ctx.eps, ctx.tau), None, None, None


def _plan_backward(plan: torch.Tensor, grad: torch.Tensor, eps: float, tau: float) -> torch.Tensor:
    """dL/dC from dL/dP (`ImplicitPlan`), one problem at a time for a batch."""
    if plan.dim() > 2:
        return torch.stack([_plan_backward(p, g, eps, tau) for p, g in zip(plan, grad)])
    P, G = plan.double(), grad.double()
    GP = G * P
    u, v = GP.sum(1), GP.sum(0)
    if P.shape[0] < P.shape[1]:
        w2, w1 = _schur_solve(P.T, v, u, tau)
    else:
        w1, w2 = _schur_solve(P, u, v, tau)
    dC = P * (tau * (w1[:, None] + w2[None, :]) - G) / eps
    return dC.to(grad.dtype)


def _kl(p: torch.Tensor, q: torch.Tensor, dims: int) -> torch.Tensor:
    """Generalised KL(p | q) = sum p log(p/q) - p + q over the last `dims` dimensions (one value a problem)."""
    axes = tuple(range(-dims, 0))
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q)), 0.0) - p + q
    return terms.sum(axes)


def entropic_ot(
    C: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, eps: float = 0.05,
    rho: float | None = None, max_iter: int = 1000, tol: float = 1e-6, overrelax: float = 1.0,
) -> OTResult:
    """Entropic OT between uniform (default) or given marginals.

    C: (n, m) cost, may require grad; solved in float32 at least, whatever autocast is active. A batch
    (..., n, m) of problems is solved together (`sinkhorn_potentials`); `value` then has one entry a problem.
    eps: entropic regularisation. rho: None for balanced OT, else the KL marginal relaxation
    strength (unbalanced OT, for sets whose class mix differs). overrelax: the over-relaxation
    factor (1.5 takes fewer iterations to the same solution). Warns when `max_iter` is reached
    with the marginal error above `tol`. Gradients: `value` by the envelope theorem, `plan`
    through `ImplicitPlan`.
    """
    with torch.autocast(C.device.type, enabled=False):
        C = C.to(_ot_dtype(C))
        a = uniform(C.shape[-2], C) if a is None else a.to(C.dtype)
        b = uniform(C.shape[-1], C) if b is None else b.to(C.dtype)
        f, g, iterations, err = sinkhorn_potentials(C.detach(), a, b, eps, rho, max_iter, tol, overrelax=overrelax)
        converged = err < tol
        if not converged:
            warnings.warn(f"Sinkhorn stopped at max_iter={max_iter} with marginal error {err:.1e} > tol {tol:.0e} "
                          f"(eps={eps}, {'x'.join(map(str, C.shape))}): raise max_iter or eps", RuntimeWarning, stacklevel=2)
        P = _kernel(C.detach(), f, g, a, b, eps)
        tau = 1.0 if rho is None else rho / (rho + eps)
        plan = ImplicitPlan.apply(C, P, eps, tau) if C.requires_grad else P
        transport = (P * C).sum((-2, -1))
        rows, cols = P.sum(-1), P.sum(-2)
        const = _entropy_term(f, g, rows, cols, transport.detach(), a, b, eps)
        if rho is not None:
            const = const + rho * (_kl(rows, a, 1) + _kl(cols, b, 1))
        value = transport + const
        return OTResult(value, plan, transport.detach(), iterations, err, converged)


def _entropy_term(f: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, transport: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """eps KL(P | a b^T) of the plan P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), from its potentials and marginals
    (r = P 1, c = P^T 1, <P, C> = `transport`) rather than a log over every entry (0.35 ms against 4.3 for a
    1024 x 1024 plan on 2 cores):
        eps KL = sum_ij P_ij (f_i + g_j - C_ij) - eps sum P + eps sum ab = <f, r> + <g, c> - <P, C> - eps (sum r - sum ab).
    """
    return ((f * rows).sum(-1) + (g * cols).sum(-1) - transport
            - eps * (rows.sum(-1) - a.sum(-1) * b.sum(-1)))


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, eps: float = 0.05, rho: float | None = None,
                        cost=None, tol: float = 1e-6, overrelax: float = 1.0) -> torch.Tensor:
    """Debiased S_eps(x, y) = OT(x, y) - OT(x, x)/2 - OT(y, y)/2 (Feydy et al. 2019): zero when x = y."""
    cost = cost or cosine_cost

    def ot(p, q):
        return entropic_ot(cost(p, q), eps=eps, rho=rho, tol=tol, overrelax=overrelax, max_iter=5000).value

    return ot(x, y) - 0.5 * ot(x, x) - 0.5 * ot(y, y)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = 1 - <x_i, y_j> for L2-normalised rows; float32 at least, also under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(_ot_dtype(x), y.dtype)
        return 1.0 - x.to(dtype) @ y.to(dtype).T


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = ||x_i - y_j||^2; float32 at least, also under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        dtype = torch.promote_types(_ot_dtype(x), y.dtype)
        x, y = x.to(dtype), y.to(dtype)
        return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
