"""Central finite differences: the independent reference for analytic gradients in the tests."""

from __future__ import annotations


def central_differences(f, x, h: float = 1e-6):
    """d f / d x entry by entry, f(x +- h e_ij) evaluated afresh (every OT plan solved anew)."""
    import torch

    grad = torch.zeros_like(x)
    for index in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[index] = h
        step = step.view_as(x)
        grad.view(-1)[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def agreement(grad, reference) -> tuple[float, float]:
    """(cosine, norm ratio) between an analytic gradient and its finite-difference reference."""
    cosine = float((grad * reference).sum() / (grad.norm() * reference.norm()))
    return cosine, float(grad.norm() / reference.norm())
