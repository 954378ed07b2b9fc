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
log-potentials f, g (Schmitzer); they stop as soon as the marginal error is below `tol`; and the
value's gradient comes from the envelope theorem (d OT / d C = P*), so nothing backpropagates
through the iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ABSORB_ABOVE = 1e4  # scalings larger than this are folded into the potentials


@dataclass
class OTResult:
    value: torch.Tensor  # OT_eps (entropic objective); gradient w.r.t. C is the plan (envelope theorem)
    plan: torch.Tensor  # (n, m) optimal plan; differentiable w.r.t. C at the fixed optimal potentials
    transport_cost: torch.Tensor  # <P, C>, the quantity POT's sinkhorn2 returns
    iterations: int
    marginal_error: float


def uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


@torch.no_grad()
def sinkhorn_potentials(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, rho: float | None = None,
    max_iter: int = 1000, tol: float = 1e-6, check_every: int = 5, overrelax: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Optimal log-potentials (f, g) of the entropic (un)balanced problem; also iterations and error.

    The error is the L1 distance of the plan's row marginal to `a` (columns are exact after each
    g-update in the balanced case); for unbalanced problems it is the change of the scalings.
    """
    tau = 1.0 if rho is None else rho / (rho + eps)
    f = C.min(dim=1).values  # a shift that keeps the first kernel from underflowing
    g = torch.zeros_like(b)
    u, v = torch.ones_like(a), torch.ones_like(b)
    K = torch.exp((f[:, None] + g[None, :] - C) / eps) * a[:, None] * b[None, :]
    err, it = math.inf, 0
    for it in range(1, max_iter + 1):
        u_prev = u
        if tau == 1.0 and overrelax != 1.0:  # over-relaxed scaling (Thibault et al. 2021): same fixed point
            u = u ** (1 - overrelax) * (a / (K @ v)) ** overrelax
            v = v ** (1 - overrelax) * (b / (K.T @ u)) ** overrelax
        elif tau == 1.0:
            u = a / (K @ v)
            v = b / (K.T @ u)
        else:  # the fixed point is f = tau F(g): potentials already absorbed into K must be discounted
            u = (a / (K @ v)) ** tau * torch.exp((tau - 1.0) * f / eps)
            v = (b / (K.T @ u)) ** tau * torch.exp((tau - 1.0) * g / eps)
        if it % check_every and it != max_iter:
            continue  # host synchronisation (costly on a GPU) only every `check_every` iterations
        if rho is None:
            error = (u * (K @ v) - a).abs().sum()
        else:
            error = (u - u_prev).abs().max() / u.abs().max().clamp_min(1.0)
        largest = torch.maximum(u.max(), v.max())
        err, largest = (float(t) for t in torch.stack([error, largest]).tolist())
        if not math.isfinite(err) or not math.isfinite(largest):
            raise FloatingPointError(f"Sinkhorn diverged at iteration {it} (eps={eps} too small for this cost?)")
        if err < tol:
            break
        if largest > ABSORB_ABOVE:
            f, g = f + eps * torch.log(u), g + eps * torch.log(v)
            u, v = torch.ones_like(u), torch.ones_like(v)
            K = torch.exp((f[:, None] + g[None, :] - C) / eps) * a[:, None] * b[None, :]
    return f + eps * torch.log(u), g + eps * torch.log(v), it, err


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Generalised KL(p | q) = sum p log(p/q) - p + q."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q)), 0.0).sum() - p.sum() + q.sum()


def entropic_ot(
    C: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, eps: float = 0.05,
    rho: float | None = None, max_iter: int = 1000, tol: float = 1e-6, overrelax: float = 1.0,
) -> OTResult:
    """Entropic OT between uniform (default) or given marginals, with envelope-theorem gradients.

    C: (n, m) cost, may require grad. eps: entropic regularisation. rho: None for balanced OT,
    else the KL marginal relaxation strength (unbalanced OT, for sets whose class mix differs).
    """
    a = uniform(C.shape[0], C) if a is None else a
    b = uniform(C.shape[1], C) if b is None else b
    f, g, iterations, err = sinkhorn_potentials(C.detach(), a, b, eps, rho, max_iter, tol)
    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - C) / eps)
    P = plan.detach()
    ab = a[:, None] * b[None, :]
    const = eps * _kl(P, ab)
    if rho is not None:
        const = const + rho * (_kl(P.sum(1), a) + _kl(P.sum(0), b))
    value = (P * C).sum() + const.detach()
    return OTResult(value, plan, (P * C.detach()).sum(), iterations, err)


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, eps: float = 0.05, rho: float | None = None,
                        cost=None, tol: float = 1e-6) -> torch.Tensor:
    """Debiased S_eps(x, y) = OT(x, y) - OT(x, x)/2 - OT(y, y)/2 (Feydy et al. 2019): zero when x = y."""
    cost = cost or cosine_cost
    return (entropic_ot(cost(x, y), eps=eps, rho=rho, tol=tol).value
            - 0.5 * entropic_ot(cost(x, x), eps=eps, rho=rho, tol=tol).value
            - 0.5 * entropic_ot(cost(y, y), eps=eps, rho=rho, tol=tol).value)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = 1 - <x_i, y_j> for L2-normalised rows."""
    return 1.0 - x @ y.T


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
