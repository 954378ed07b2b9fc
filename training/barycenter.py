"""Free-support entropic Wasserstein barycenter (Cuturi & Doucet 2014, fixed-point on the support).

Problem: given measures mu_m = sum_i a_mi delta_{x_mi} and weights w_m (sum 1), find support
Y = (y_1..y_k) with uniform weights b minimising  sum_m w_m OT_eps(b, a_m; C(Y, X_m)),  C the squared
Euclidean cost. Fixed point (the barycentric projection): Y <- sum_m w_m diag(1/b) P_m X_m where
P_m is the optimal (k, n_m) plan from Y to mu_m. Reference: POT's
`ot.bregman.free_support_sinkhorn_barycenter` (same iteration; compared in the tests).
"""

from __future__ import annotations

import torch

from .sinkhorn import entropic_ot, sqeuclidean_cost, uniform


@torch.no_grad()
def free_support_barycenter(
    measures: list[torch.Tensor], init: torch.Tensor, weights: list[float] | None = None, eps: float = 0.05,
    n_iter: int = 10, tol: float = 1e-7, inner_tol: float = 1e-6, overrelax: float = 1.0,
) -> torch.Tensor:
    """(k, d) barycenter support, starting from `init` (k, d); each measure uniform over its rows."""
    weights = weights or [1.0 / len(measures)] * len(measures)
    Y = init.clone()
    b = uniform(len(Y), Y)
    for _ in range(n_iter):
        new = torch.zeros_like(Y)
        for w, X in zip(weights, measures):
            plan = entropic_ot(sqeuclidean_cost(Y, X), b, uniform(len(X), X), eps, tol=inner_tol,
                               overrelax=overrelax).plan
            new += w * (plan @ X) / b[:, None]
        shift = float((new - Y).pow(2).sum())
        Y = new
        if shift < tol:
            break
    return Y
