"""Free-support entropic Wasserstein barycenter (Cuturi & Doucet 2014, fixed point on the support),
plain or debiased.

Problem: given measures mu_m = sum_i a_mi delta_{x_mi} and weights w_m (sum 1), find support
Y = (y_1..y_k) with uniform weights b minimising
    plain:     sum_m w_m OT_eps(b, a_m; C(Y, X_m))
    debiased:  sum_m w_m S_eps(b, a_m; Y, X_m),  S_eps(nu, mu) = OT(nu, mu) - OT(nu, nu)/2 - OT(mu, mu)/2
with C the squared Euclidean cost. With P_m the optimal (k, n_m) plan from Y to mu_m and Q the
optimal (k, k) plan from Y to itself, the gradient in y_k is 2 (b_k y_k - sum_m w_m (P_m X_m)_k) for
the plain objective and 2 ((Q Y)_k - sum_m w_m (P_m X_m)_k) for the debiased one, so the fixed points are
    plain:     Y <- sum_m w_m diag(1/b) P_m X_m                          (the barycentric projection)
    debiased:  Y <- sum_m w_m diag(1/b) P_m X_m + (Y - diag(1/b) Q Y)     (minus Y's own entropic blur)
The plain barycenter of a measure with itself is a blurred, contracted copy; the debiased one is
the measure (Janati, Cuturi, Gramfort 2020, "Debiased Sinkhorn barycenters"). Reference for the
plain iteration: POT's `ot.bregman.free_support_sinkhorn_barycenter` (compared in the tests).
"""

from __future__ import annotations

import torch

from .sinkhorn import entropic_ot, sqeuclidean_cost, uniform


@torch.no_grad()
def free_support_barycenter(
    measures: list[torch.Tensor], init: torch.Tensor, weights: list[float] | None = None, eps: float = 0.05,
    n_iter: int = 10, tol: float = 1e-7, inner_tol: float = 1e-6, overrelax: float = 1.0, debiased: bool = False,
) -> torch.Tensor:
    """(k, d) barycenter support, starting from `init` (k, d); each measure uniform over its rows.
    Stops after `n_iter` updates or when the support moves less than `tol` (squared Frobenius)."""
    weights = weights or [1.0 / len(measures)] * len(measures)
    Y = init.clone()
    b = uniform(len(Y), Y)

    def projection(X: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        plan = entropic_ot(sqeuclidean_cost(Y, X), b, a, eps, tol=inner_tol, overrelax=overrelax, max_iter=5000).plan
        return (plan @ X) / b[:, None]

    for _ in range(n_iter):
        new = sum(w * projection(X, uniform(len(X), X)) for w, X in zip(weights, measures))
        if debiased:
            new = new + Y - projection(Y, b)
        shift = float((new - Y).pow(2).sum())
        Y = new
        if shift < tol:
            break
    return Y
