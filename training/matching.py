"""Global OT matching for `ot-match`: an entropic plan between ALL unpaired image and ALL unpaired
text embeddings, whose confident entries become soft pseudo-pairs.

For each image i, its partner is j* = argmax_j P_ij, kept when the mass P_ij* is at least
`min_mass` times the uniform mass 1/n (plan mass relative to a perfect one-to-one match); the
pair's weight is that relative mass, capped at 1. Large sets are matched block by block
(random blocks of `block` images against their nearest texts), and unbalanced OT (`rho`) lets
items without a partner keep little mass instead of forcing a match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sinkhorn import cosine_cost, entropic_ot


@dataclass
class Matching:
    images: torch.Tensor  # (p,) indices into the unpaired images
    texts: torch.Tensor  # (p,) indices into the unpaired texts
    weights: torch.Tensor  # (p,) in (0, 1]


@torch.no_grad()
def global_matching(x: torch.Tensor, y: torch.Tensor, eps: float = 0.02, rho: float | None = None,
                    min_mass: float = 0.3, block: int = 4096, seed: int = 0) -> Matching:
    """Pseudo-pairs between all rows of x (images) and all rows of y (texts), both L2-normalised."""
    n = len(x)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if n > block else torch.arange(n)
    imgs, txts, ws = [], [], []
    for start in range(0, n, block):
        rows = order[start : start + block].to(x.device)
        if len(y) > block:  # the texts most similar to this block, as many as the block
            cols = (x[rows] @ y.T).max(dim=0).values.topk(min(len(y), len(rows))).indices
        else:
            cols = torch.arange(len(y), device=y.device)
        plan = entropic_ot(cosine_cost(x[rows], y[cols]), eps=eps, rho=rho, tol=1e-4).plan
        mass, j = plan.max(dim=1)
        relative = mass * len(rows)
        keep = relative >= min_mass
        imgs.append(rows[keep])
        txts.append(cols[j[keep]])
        ws.append(relative[keep].clamp(max=1.0))
    return Matching(torch.cat(imgs), torch.cat(txts), torch.cat(ws))
