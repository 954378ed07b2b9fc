"""Training losses. Each is a small module whose forward returns a dict of named terms; the trainer
adds `contrastive_loss` and alpha times every regularizer term, and logs each one.

Notation: x = image embeddings, y = text embeddings, all L2-normalised; s_ij = <x_i, y_j>;
OT costs C_ij = 1 - s_ij (cosine), entropic OT as in `sinkhorn.py`. Inside training, Sinkhorn stops
at an L1 marginal error of TRAIN_TOL (0.1% of the mass): float32 cannot go much further, and the
plan changes little past it while the iteration count grows several-fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .barycenter import free_support_barycenter
from .sinkhorn import cosine_cost, entropic_ot, sinkhorn_divergence, sqeuclidean_cost

TRAIN_TOL = 1e-3
OVERRELAX = 1.5  # over-relaxed Sinkhorn: same solution, fewer iterations


def step_ot(C: torch.Tensor, eps: float, rho: float | None = None):
    """Entropic OT as solved inside a training step (TRAIN_TOL, over-relaxed)."""
    return entropic_ot(C, eps=eps, rho=rho, tol=TRAIN_TOL, overrelax=OVERRELAX)


@dataclass
class StepEmbeddings:
    """The embeddings of one training step."""

    pair_images: torch.Tensor  # (B, d) anchors: images that have a caption
    pair_texts: torch.Tensor  # (B, d) their captions
    images: torch.Tensor  # (U, d) unpaired images
    texts: torch.Tensor  # (V, d) unpaired texts
    logit_scale: torch.Tensor  # exp() gives the inverse temperature
    pair_positives: torch.Tensor | None = None  # (B, B) bool: pairs that are positives of each other; None = diagonal
    match_images: torch.Tensor | None = None  # ot-match pseudo-pairs
    match_texts: torch.Tensor | None = None
    match_weights: torch.Tensor | None = None


def clip_loss(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, weights: torch.Tensor | None = None,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: row i of x matches row i of y. L = (CE(S, I) + CE(S^T, I)) / 2, S = e^scale x y^T.
    Optional per-pair weights (pseudo-pairs weighted by their plan mass). Optional (B, B) boolean
    `positives` (diagonal set): the target of each row is spread uniformly over its positives, as in
    UniCL (Yang et al. 2022), so that two rows with the same caption or class are not pushed apart."""
    logits = logit_scale.exp().clamp(max=100) * x @ y.T
    if positives is None:
        rows = cols = torch.arange(len(x), device=x.device)
    else:
        p = positives.to(logits.dtype)
        rows, cols = p / p.sum(1, keepdim=True), p.T / p.T.sum(1, keepdim=True)
    per_pair = (F.cross_entropy(logits, rows, reduction="none") + F.cross_entropy(logits.T, cols, reduction="none")) / 2
    if weights is None:
        return per_pair.mean()
    return (weights * per_pair).sum() / weights.sum().clamp_min(1e-12)


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E_{i != j} exp(-t ||x_i - x_j||^2) (Wang & Isola 2020): near 0 means collapsed, lower is spread."""
    sq = torch.pdist(x.float()).pow(2)
    return torch.log(torch.exp(-t * sq).mean().clamp_min(1e-30))


class ContrastiveLoss(nn.Module):
    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        return {"contrastive_loss": clip_loss(e.pair_images, e.pair_texts, e.logit_scale, positives=e.pair_positives)}


class PairwiseOT(nn.Module):
    """`ot-pairwise`: OT_eps(images, texts), or the debiased Sinkhorn divergence."""

    def __init__(self, eps: float = 0.05, rho: float | None = None, debiased: bool = False) -> None:
        super().__init__()
        self.eps, self.rho, self.debiased = eps, rho, debiased

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        if self.debiased:
            return {"ot_pairwise": sinkhorn_divergence(e.images, e.texts, self.eps, self.rho, tol=TRAIN_TOL)}
        return {"ot_pairwise": step_ot(cosine_cost(e.images, e.texts), self.eps, self.rho).value}


def loop_consistency(P_IA: torch.Tensor, P_AT: torch.Tensor, P_IT: torch.Tensor) -> torch.Tensor:
    """Squared Hellinger distance between the image -> anchor -> text coupling and the direct one:

        G = P_IA diag(1 / P_AT 1) P_AT   (the gluing of the two plans through the anchors),
        H^2(G, P_IT) = sum_ij (sqrt G_ij - sqrt (P_IT)_ij)^2,   in [0, 2] for probability couplings.

    Both couple the images' and the texts' measures, so the distance does not shrink with the batch
    size as the raw Frobenius norm of their difference does (entries ~ 1 / n^2). Plans carry implicit
    gradients (`ImplicitPlan`), so the term's gradient sees how the plans move with the cost."""
    glued = P_IA @ (P_AT / P_AT.sum(1, keepdim=True))
    return (glued.clamp_min(1e-30).sqrt() - P_IT.clamp_min(1e-30).sqrt()).pow(2).sum()


class LoopOT(nn.Module):
    """`ot-loop`: W(I, A) + W(A, T) + W(I, T) + lambda H^2(P_IA diag(1/b_A) P_AT, P_IT) (Zhu & Luo, PRCV 2024).

    I: unpaired images, T: unpaired texts, A: the step's paired anchors. W(I, A) compares images with
    the anchors' images, W(A, T) the anchors' texts with the texts, W(I, T) is cross-modal; the
    consistency term (`loop_consistency`) asks that going round the loop through the anchors
    transports the images to the texts as the direct plan does.
    """

    def __init__(self, eps: float = 0.05, rho: float | None = None, lam: float = 1.0, tol: float = TRAIN_TOL) -> None:
        super().__init__()
        self.eps, self.rho, self.lam, self.tol = eps, rho, lam, tol

    def _ot(self, C: torch.Tensor):
        return entropic_ot(C, eps=self.eps, rho=self.rho, tol=self.tol, overrelax=OVERRELAX, max_iter=5000)

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        ia = self._ot(cosine_cost(e.images, e.pair_images))
        at = self._ot(cosine_cost(e.pair_texts, e.texts))
        it = self._ot(cosine_cost(e.images, e.texts))
        return {"ot_loop_IA": ia.value, "ot_loop_AT": at.value, "ot_loop_IT": it.value,
                "ot_loop_consistency": self.lam * loop_consistency(ia.plan, at.plan, it.plan)}


class BarycenterOT(nn.Module):
    """`ot-barycenter`: sum_m w_m S_eps(mu_m, B), B the free-support Wasserstein barycenter of the image and
    text batches (Zhu & Luo, PRCV 2024: both modalities transported to one barycenter), equal weights.

    S_eps is the debiased Sinkhorn divergence, S(mu, nu) = OT(mu, nu) - OT(mu, mu)/2 - OT(nu, nu)/2
    (Feydy et al. 2019) to the debiased barycenter (Janati et al. 2020), with squared Euclidean cost,
    so the term is ~0 when the two batches coincide and grows as they separate; the entropic blur
    of plain OT_eps made the old value (64 support points, 5 iterations) read 1.000 for independent
    batches and 1.003 for identical ones. The support has as many points as the larger batch,
    starts at the image batch, and is iterated until it moves less than `tol`. B is held fixed in
    the gradient: at the barycenter's optimum its own variation does not change the value to first
    order (envelope theorem)."""

    def __init__(self, eps: float = 0.05, support: int | None = None, n_iter: int = 30, tol: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.support, self.n_iter, self.tol = eps, support, n_iter, tol

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        images, texts = e.images.detach(), e.texts.detach()
        k = self.support or max(len(images), len(texts))
        union = torch.cat([images, texts])
        init = images if k == len(images) else union[torch.linspace(0, len(union) - 1, k, device=union.device).long()]
        # squared Euclidean between unit vectors is 2 (1 - cos): eps doubles with it
        eps = self.eps * 2
        B = free_support_barycenter([images, texts], init, eps=eps, n_iter=self.n_iter, tol=self.tol,
                                    inner_tol=TRAIN_TOL, overrelax=OVERRELAX, debiased=True)
        value = sum(0.5 * sinkhorn_divergence(m, B, eps, cost=sqeuclidean_cost, tol=TRAIN_TOL, overrelax=OVERRELAX)
                    for m in (e.images, e.texts))
        return {"ot_barycenter": value}


class MMCLPseudoPairs(nn.Module):
    """`mmcl-pseudo` (Nakada et al., AISTATS 2023): the top-m entries of the unpaired batch's similarity
    matrix are taken as positive pairs in the contrastive loss (one per image and per text at most)."""

    def __init__(self, top_m: int | None = None) -> None:
        super().__init__()
        self.top_m = top_m

    @staticmethod
    @torch.no_grad()
    def select(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy one-to-one selection of the m largest entries: (image indices, text indices)."""
        n_cols = scores.shape[1]
        # each row's and each column's best entries are the only candidates a greedy pass can take first
        candidates = torch.cat([scores.topk(min(n_cols, 8), dim=1).indices
                                + torch.arange(len(scores), device=scores.device)[:, None] * n_cols]).flatten()
        candidates = candidates[scores.flatten()[candidates].argsort(descending=True)]
        rows, cols, used_r, used_c = [], [], set(), set()
        for flat in candidates.tolist():
            r, c = divmod(flat, n_cols)
            if r in used_r or c in used_c:
                continue
            rows.append(r)
            cols.append(c)
            used_r.add(r)
            used_c.add(c)
            if len(rows) == m:
                break
        return torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        m = self.top_m or max(1, min(len(e.images), len(e.texts)) // 4)
        rows, cols = self.select(e.images @ e.texts.T, m)
        return {"mmcl_pseudo": clip_loss(e.images[rows], e.texts[cols], e.logit_scale)}


class OTMatchLoss(nn.Module):
    """`ot-match`: contrastive loss on the pseudo-pairs found by global OT matching, weighted by plan mass."""

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        if e.match_images is None or len(e.match_images) < 2:
            return {"ot_match": e.logit_scale.new_zeros(())}
        return {"ot_match": clip_loss(e.match_images, e.match_texts, e.logit_scale, e.match_weights)}


REGULARIZERS = ("none", "ot-pairwise", "ot-loop", "ot-barycenter", "ot-match", "mmcl-pseudo")


def build_regularizer(name: str, eps: float = 0.05, rho: float | None = None, debiased: bool = False,
                      loop_lambda: float = 1.0, barycenter_support: int | None = None) -> nn.Module | None:
    if name == "none":
        return None
    if name == "ot-pairwise":
        return PairwiseOT(eps, rho, debiased)
    if name == "ot-loop":
        return LoopOT(eps, rho, loop_lambda)
    if name == "ot-barycenter":
        return BarycenterOT(eps, barycenter_support)
    if name == "ot-match":
        return OTMatchLoss()
    if name == "mmcl-pseudo":
        return MMCLPseudoPairs()
    raise ValueError(f"--reg {name!r}: expected one of {', '.join(REGULARIZERS)}")
