"""Global OT matching for `ot-match`: an entropic plan between ALL unpaired image and ALL unpaired
text embeddings, whose confident entries become soft pseudo-pairs.

For each image i, its partner is j* = argmax_j P_ij with relative mass m_i = n P_ij* (1 for a
perfect one-to-one match). A pair is kept when m_i >= `min_mass`, or when it is among the
`keep_fraction` most confident rows: when many texts are near-duplicates (class-level captions)
the plan spreads an image's mass over all of them and no single entry is large, yet the argmax is
still a caption of the right kind. Weights are m_i divided by the largest kept m, so the surest
pair weighs 1. Large sets are matched block by block
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
                    min_mass: float = 0.3, keep_fraction: float = 0.5, block: int = 4096, seed: int = 0) -> Matching:
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
        n_top = int(keep_fraction * len(rows))
        if n_top:
            keep[relative.topk(n_top).indices] = True
        imgs.append(rows[keep])
        txts.append(cols[j[keep]])
        ws.append(relative[keep])
    weights = torch.cat(ws)
    return Matching(torch.cat(imgs), torch.cat(txts), weights / weights.max().clamp_min(1e-12))
