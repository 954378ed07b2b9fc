"""Training losses. Each is a small module whose forward returns a dict of named terms; the trainer
combines `contrastive_loss` with alpha times the regularizer's terms as its schedule says
(`step_total`), and logs each one. Regularizers are registered at the end of this module.

Notation: x = image embeddings, y = text embeddings, all L2-normalised; s_ij = <x_i, y_j>;
OT costs C_ij = 1 - s_ij (cosine), entropic OT as in `sinkhorn.py`. Inside training, Sinkhorn stops
at an L1 marginal error of TRAIN_TOL (0.1% of the mass): float32 cannot go much further, and the
plan changes little past it while the iteration count grows several-fold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .barycenter import free_support_barycenter
from .cluster_matching import cluster_matching
from .config import RegularizerOptions
from .matching import Matching, nearest_text_pairs, ot_matching
from .sinkhorn import AUTO, cosine_cost, entropic_ot, sinkhorn_divergence, sqeuclidean_cost

TRAIN_TOL = 1e-3
OVERRELAX = AUTO  # over-relaxed Sinkhorn after plain iterations: same solution, fewer iterations


def step_ot(C: torch.Tensor, eps: float, rho: float | None = None, tol: float = TRAIN_TOL, max_iter: int = 1000):
    """Entropic OT as solved inside a training step (TRAIN_TOL, over-relaxed)."""
    return entropic_ot(C, eps=eps, rho=rho, tol=tol, overrelax=OVERRELAX, max_iter=max_iter)


def step_ot_values(costs: list[torch.Tensor], eps: float, batched: bool | None = None) -> list[torch.Tensor]:
    """OT_eps of each cost matrix as `step_ot` solves it. `batched` (default: on a GPU): the problems of one
    shape are stacked into one batch, one Sinkhorn loop for them all (a step there is bound by kernel launches
    and host checks, not arithmetic); else one by one, as on the CPU (a batch iterates as long as its slowest
    problem: the barycenter term took 356 ms a step batched against 235 alone at batch 1024)."""
    if not (costs[0].is_cuda if batched is None else batched):
        return [step_ot(cost, eps, max_iter=5000).value for cost in costs]
    values: list[torch.Tensor | None] = [None] * len(costs)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for k, cost in enumerate(costs):
        shapes.setdefault(tuple(cost.shape), []).append(k)
    for members in shapes.values():
        solved = step_ot(torch.stack([costs[k] for k in members]), eps, max_iter=5000).value
        for k, value in zip(members, solved):
            values[k] = value
    return values


@dataclass
class StepEmbeddings:
    """The embeddings of one training step."""

    pair_images: torch.Tensor  # (B, d) anchors: images that have a caption
    pair_texts: torch.Tensor  # (B, d) their captions
    images: torch.Tensor  # (U, d) unpaired images
    texts: torch.Tensor  # (V, d) unpaired texts
    logit_scale: torch.Tensor  # exp() gives the inverse temperature
    pair_positives: torch.Tensor | None = None  # (B, B) bool: pairs that are positives of each other; None = diagonal
    match_images: torch.Tensor | None = None  # pool-level pseudo-pairs (ot-match, mmcl-pool), row i with row i
    match_texts: torch.Tensor | None = None
    match_weights: torch.Tensor | None = None
    match_positives: torch.Tensor | None = None  # (M, M) bool: pseudo-pairs of one group (ot-cluster); None = diagonal


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
        if len(e.pair_images) == 0:  # a corpus of unpaired data alone
            return {"contrastive_loss": e.logit_scale.new_zeros(())}
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
    gradients (`ImplicitPlan`), so the term's gradient sees how the plans move with the cost. Computed as
    sum G + sum P_IT - 2 sum sqrt(G o P_IT) (the same sum, expanded): half the passes over the n x m matrices of
    (sqrt G - sqrt P)^2, 3.8 against 7.9 ms forward + backward at 1024 x 1024 on 2 cores."""
    glued = P_IA @ (P_AT / P_AT.sum(1, keepdim=True))
    return glued.sum() + P_IT.sum() - 2.0 * (glued * P_IT).clamp_min(1e-30).sqrt().sum()


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
        return step_ot(C, self.eps, self.rho, self.tol, max_iter=5000)

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        ia = self._ot(cosine_cost(e.images, e.pair_images))
        at = self._ot(cosine_cost(e.pair_texts, e.texts))
        it = self._ot(cosine_cost(e.images, e.texts))
        return {"ot_loop_IA": ia.value, "ot_loop_AT": at.value, "ot_loop_IT": it.value,
                "ot_loop_consistency": self.lam * loop_consistency(ia.plan, at.plan, it.plan)}


class BarycenterOT(nn.Module):
    """`ot-barycenter`: sum_m w_m S_eps(mu_m, B), B the Wasserstein barycenter of the image and text batches
    (Zhu & Luo, PRCV 2024: both modalities transported to one barycenter), equal weights w_m = 1/2.

    For two measures with equal weights the W2 barycenter is McCann's displacement interpolant at
    t = 1/2 (McCann 1997; Agueh & Carlier 2011): B = { (x_i + T(x_i)) / 2 }, T the transport map from
    the images to the texts, here the entropic plan's barycentric map T(x_i) = n sum_j P_ij y_j. It is
    closed-form (one OT problem, no fixed-point iterations) and has as many points as the image batch.
    `refine` > 0 continues with that many iterations of the debiased free-support fixed point
    (`free_support_barycenter(debiased=True)`, Janati et al. 2020), which converges slowly.

    S_eps is the debiased Sinkhorn divergence, S(mu, nu) = OT(mu, nu) - OT(mu, mu)/2 - OT(nu, nu)/2
    (Feydy et al. 2019), with squared Euclidean cost: the term is ~0 when the batches coincide and
    grows as they separate (for the unregularised W2 it equals W2^2(mu_1, mu_2) / 4). The entropic
    blur of plain OT_eps made the old value (64 support points, 5 iterations) read 1.000 for
    independent batches and 1.003 for identical ones. B is held fixed in the gradient (envelope theorem)."""

    def __init__(self, eps: float = 0.05, refine: int = 0) -> None:
        super().__init__()
        self.eps, self.refine = eps, refine

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        images, texts = e.images.detach(), e.texts.detach()
        eps = self.eps * 2  # squared Euclidean between unit vectors is 2 (1 - cos): eps doubles with it
        plan = step_ot(sqeuclidean_cost(images, texts), eps, max_iter=5000).plan
        B = 0.5 * images + 0.5 * (plan @ texts) / plan.sum(1, keepdim=True)
        if self.refine:
            B = free_support_barycenter([images, texts], B, eps=eps, n_iter=self.refine, inner_tol=TRAIN_TOL,
                                        overrelax=OVERRELAX, debiased=True)
        pairs = [(e.images, B), (e.texts, B), (e.images, e.images), (e.texts, e.texts), (B, B)]
        ib, tb, ii, tt, bb = step_ot_values([sqeuclidean_cost(p, q) for p, q in pairs], eps)
        # sum_m 1/2 S(mu_m, B), with OT(B, B) (no gradient: B is held fixed) solved once for both measures
        return {"ot_barycenter": 0.5 * (ib + tb) - 0.25 * (ii + tt) - 0.5 * bb}


def top_b_pseudo_pair_loss(x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Nakada et al.'s loss on unpaired data (AISTATS 2023; the authors' nswa17/MMCL notebook).

    s_ij = <x_i, y_j> / tau over a batch of images x (n, d) and texts y (m, d); S = the B = min(n, m)
    largest entries of the flattened n x m matrix, taken as positives (several may share a row or a
    column: not a one-to-one matching):
        L = ( -2 sum_{(i,j) in S} s_ij + sum_i log sum_j e^{s_ij} + sum_j log sum_i e^{s_ij} ) / (2B).
    """
    s = x @ y.T / tau
    b = min(s.shape)
    top = s.flatten().topk(b).values
    return (-2.0 * top.sum() + torch.logsumexp(s, 1).sum() + torch.logsumexp(s, 0).sum()) / (2 * b)


class NakadaPseudoPairs(nn.Module):
    """`mmcl-nakada`: Nakada et al.'s second stage, faithfully (`top_b_pseudo_pair_loss` at tau = 1 on the
    unpaired batch, after a first stage on the pairs, with no paired loss in the second stage).
    It assumes that each unpaired image's hidden partner is in the same batch, as in their
    experiment; where batches are drawn independently (real corpora: partners unknown) few are,
    and `mmcl-pool` gathers likely partners into the batch first."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        return {"mmcl_nakada": top_b_pseudo_pair_loss(e.images, e.texts, self.tau)}


class PoolPseudoPairs(nn.Module):
    """`mmcl-pool`: Nakada et al.'s loss on batches whose partners are gathered from the whole unpaired
    pool: every `match_every` steps each unpaired image's nearest distinct unpaired text, one-to-one over
    the pool (`matching.nearest_text_pairs`), becomes a candidate pair, and each step's batch is
    drawn from them, so the top-B selection has partners to find without assuming they share a batch."""

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        if e.match_images is None or len(e.match_images) < 2:
            return {"mmcl_pool": e.logit_scale.new_zeros(())}
        return {"mmcl_pool": top_b_pseudo_pair_loss(e.match_images, e.match_texts, self.tau)}


class PseudoPairContrastive(nn.Module):
    """`ot-match` and `ot-cluster`: the contrastive loss (`clip_loss`) on the pool's pseudo-pairs, weighted as the
    pairing weighs them; pseudo-pairs of one group (`Matching.groups`) are positives of each other. `ot-match`
    pairs by global OT (`matching.ot_matching`, weights: plan mass), `ot-cluster` by matching clusters
    (`cluster_matching.cluster_matching`)."""

    def __init__(self, term: str) -> None:
        super().__init__()
        self.term = term

    def forward(self, e: StepEmbeddings) -> dict[str, torch.Tensor]:
        if e.match_images is None or len(e.match_images) < 2:
            return {self.term: e.logit_scale.new_zeros(())}
        return {self.term: clip_loss(e.match_images, e.match_texts, e.logit_scale, e.match_weights, e.match_positives)}


# --- the registry: the trainer, the CLI and the experiment read it; none of them names a regularizer --------
SCHEDULES = {
    "joint": "L_clip + alpha R from the first step",
    "after-pairs": "L_clip alone for the first stage (--pseudo-warmup), then L_clip + alpha R",
    "two-stage": "L_clip alone for the first stage, then alpha R alone (Nakada et al.)",
}


@dataclass(frozen=True)
class Regularizer:
    name: str
    build: Callable[[RegularizerOptions], nn.Module]
    schedule: str = "joint"
    # pool-level pseudo-pairs: (images, texts, options, seed, matching.PoolFeatures) -> Matching
    pairing: Callable[..., Matching] | None = None
    # the RegularizerOptions it reads: a flag for another one is refused on the command line (`settings_unread_by`)
    reads: tuple[str, ...] = ()
    needs_pairs: bool = False  # whether it cannot work without paired anchors
    needs_clusters: bool = False  # whether it needs --match-clusters (data made of categories)
    # whether it reads the step's unpaired batch (StepEmbeddings.images / .texts); pool-pairing terms read only
    # their pseudo-pairs, so the trainer does not embed that batch for them (with an unlocked tower, 256 forwards)
    reads_unpaired_batch: bool = True

    @property
    def uses_eps(self) -> bool:
        """Whether --ot-eps changes it (the experiment's grid skips eps otherwise)."""
        return "eps" in self.reads


REGISTRY: dict[str, Regularizer] = {}


def register(reg: Regularizer) -> None:
    if reg.schedule not in SCHEDULES:
        raise ValueError(f"{reg.name}: schedule {reg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    REGISTRY[reg.name] = reg


register(Regularizer("ot-pairwise", lambda o: PairwiseOT(o.eps, o.rho, o.debiased), reads=("eps", "rho", "debiased")))
register(Regularizer("ot-loop", lambda o: LoopOT(o.eps, o.rho, o.loop_lambda), reads=("eps", "rho", "loop_lambda"),
                     needs_pairs=True))
register(Regularizer("ot-barycenter", lambda o: BarycenterOT(o.eps), reads=("eps",)))
register(Regularizer("ot-match", lambda o: PseudoPairContrastive("ot_match"), schedule="after-pairs",
                     reads=("eps", "match_rho", "match_min_mass", "match_min_certainty"), reads_unpaired_batch=False,
                     pairing=lambda x, y, o, seed, _: ot_matching(x, y, o.eps, o.match_rho, o.match_min_mass,
                                                                    o.match_min_certainty, seed=seed)))
# joint: the clusters' match needs no trained joint space, and a pairs-only first stage spoils it (Fashion-MNIST open
# world, 1%: precision 0.76 from the untrained model, 0.29 after the pairs of 7 classes pulled every image to them)
register(Regularizer("ot-cluster", lambda o: PseudoPairContrastive("ot_cluster"),
                     pairing=lambda x, y, o, seed, f: cluster_matching(x, y, f, o.match_clusters, o.match_structure, seed),
                     reads=("match_clusters", "match_structure"), needs_clusters=True, reads_unpaired_batch=False))
register(Regularizer("mmcl-nakada", lambda o: NakadaPseudoPairs(), schedule="two-stage"))
register(Regularizer("mmcl-pool", lambda o: PoolPseudoPairs(), schedule="two-stage",
                     pairing=lambda x, y, o, seed, _: nearest_text_pairs(x, y), reads_unpaired_batch=False))

REGULARIZERS = ("none", *REGISTRY)


def lookup(name: str) -> Regularizer | None:
    """The registered regularizer called `name` (None for "none"); a one-line error naming the choices."""
    if name == "none":
        return None
    if name not in REGISTRY:
        raise ValueError(f"--reg {name!r}: expected one of {', '.join(REGULARIZERS)}")
    return REGISTRY[name]


def build_regularizer(name: str, options: RegularizerOptions | None = None, **overrides) -> nn.Module | None:
    reg = lookup(name)
    return None if reg is None else reg.build(replace(options or RegularizerOptions(), **overrides))


def in_first_stage(schedule: str, step: int, steps: int, warmup: float) -> bool:
    """Whether a step belongs to the first stage (pairs alone) of the after-pairs and two-stage schedules:
    pseudo-pairs from an untrained model are mostly wrong."""
    return schedule != "joint" and step < warmup * steps


def step_total(contrastive: torch.Tensor, reg_terms: dict[str, torch.Tensor], alpha: float, schedule: str,
               first_stage: bool) -> torch.Tensor:
    """The loss a step minimises under a regularizer's schedule (see SCHEDULES)."""
    if (first_stage and schedule != "joint") or not reg_terms:
        return contrastive
    reg = alpha * sum(reg_terms.values())
    return reg if schedule == "two-stage" else contrastive + reg
