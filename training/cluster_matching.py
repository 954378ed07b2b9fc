"""`ot-cluster`'s pool-level pseudo-pairs: clusters of images matched to clusters of texts by fused
Gromov-Wasserstein, so that categories with no pairs at all still find their descriptions.

Per-item matching (`matching.ot_matching`) needs the joint space to already place an image near its
text; for a category no pair has taught, it does not (Fashion-MNIST open world, no pairs: the
untrained model's zero-shot pick is right for 33% of the unpaired images, a balanced plan per image
for 31%). What the frozen towers do know is the layout of each modality on its own: images of one
category cluster in the image backbone's features, descriptions of one category in the text
encoder's. Matching the two sets of clusters by their cross-modal cost AND by how each cluster sits
among the others (a cluster of bags is far from all the shoe clusters; so is the text "bag") lifts
that to 41-45% there over three seeds (k-means on the frozen features, 10 clusters a side; the clusters' purity
allows 74%: `benchmarks/cluster_matching_limits.py` shows that these signals do not single out the right
map). Where a few pairs exist they say outright which text group a cluster of their images belongs to, and the layouts place the
clusters no pair reaches: with 21 pairs of 7 seen classes (1%), 62-74% of the images get a caption of
their class over three k-means seeds (74% is what clusters of that purity allow).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from .matching import Matching, PoolFeatures, assign_one_to_one, distinct_texts


def _unit(features: torch.Tensor) -> np.ndarray:
    """L2-normalised float64 rows, on the CPU, for k-means."""
    return F.normalize(features.detach().double().cpu(), dim=1).numpy()


def _centroids(points: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(k, d) L2-normalised weighted means of the rows of each cluster."""
    w = torch.ones(len(points), dtype=points.dtype) if weights is None else weights.to(points.dtype)
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(0, labels, points * w[:, None])
    return F.normalize(sums, dim=1)


def _relative_cost(c: torch.Tensor) -> np.ndarray:
    """Cosine cost between centroids, scaled to [0, 1] so that the two modalities' layouts compare."""
    cost = (1 - c @ c.T).clamp_min(0).double()
    return (cost / cost.max().clamp_min(1e-12)).numpy()


def _cross_cost(x: torch.Tensor, distinct: torch.Tensor, counts: torch.Tensor, image_group: torch.Tensor,
                text_group: torch.Tensor, k: int, anchors: torch.Tensor) -> torch.Tensor:
    """(k, k) cross-modal cost between image clusters and text groups, in [0, 1]:
        M_cg = t_c (1 - A_cg / A_c) + (1 - t_c) J_cg,    t_c = min(1, 2 A_c / (r n_c)),
    A_cg the pairs linking cluster c with group g, A_c = sum_g A_cg, n_c the cluster's unpaired images, r the
    (lower) median of A_c / n_c over the clusters that pairs reach (pairs an image where a class has pairs), J the joint
    space's 1 - <x̄_c, ȳ_g> rescaled to [0, 1] (x̄, ȳ: normalised mean embeddings). t_c is how far the cluster's
    pairs vouch for it: a cluster with at least half the usual share of pairs (room for the counting noise of a
    few pairs) follows them, one with none the joint space; a cluster of a class without pairs that a stray pair
    of another class falls into (k-means is not pure) is not sent to that pair's group on one vote (measured at
    5% pairs: such strays put two of three seeds' pseudo-pairs at 51-58% right against 74-75% without them)."""
    joint = 1 - _centroids(x, image_group, k) @ _centroids(distinct, text_group, k, counts).T
    joint = (joint - joint.min()) / (joint.max() - joint.min()).clamp_min(1e-12)
    votes = anchors.sum(1, keepdim=True)
    reached = votes[:, 0] > 0
    if not reached.any():
        return joint
    sizes = torch.bincount(image_group, minlength=k).to(votes.dtype)[:, None].clamp_min(1)
    rate = (votes[reached] / sizes[reached]).median()
    trust = (2 * votes / (rate * sizes)).clamp(max=1)
    return trust * (1 - anchors / votes.clamp_min(1)) + (1 - trust) * joint


@dataclass
class ClusterProblem:
    """The cluster-level matching problem of `cluster_matching`: K image clusters against K text groups."""

    image_group: torch.Tensor  # (n,) each unpaired image's cluster
    text_group: torch.Tensor  # (D,) each distinct text's group
    distinct: torch.Tensor  # (D, d) the distinct texts' current embeddings (float64)
    copies: list[list[int]]  # rows of y holding each distinct text
    counts: torch.Tensor  # (D,) float64 copies of each
    cross: np.ndarray  # (K, K) M: cross-modal cost, in [0, 1]
    layouts: tuple[np.ndarray, np.ndarray]  # C1 (K, K) image clusters', C2 text groups', each in [0, 1]
    a: np.ndarray  # (K,) the clusters' shares of the images
    b: np.ndarray  # (K,) the groups' shares of the text rows

    def text_centroids(self) -> torch.Tensor:
        """(K, d) each text group's normalised mean current embedding (distinct texts weighted by their copies)."""
        return _centroids(self.distinct, self.text_group, len(self.a), self.counts)


@torch.no_grad()
def cluster_problem(x: torch.Tensor, y: torch.Tensor, features: PoolFeatures, clusters: int, seed: int = 0) -> ClusterProblem:
    """k-means of the frozen features a side (texts: distinct ones, weighted by copies), the pairs' votes A_cg
    (pairs whose image falls in cluster c and caption in group g), and from them M, C1, C2, a, b of
    `cluster_matching`'s plan."""
    distinct, copies = distinct_texts(y)
    if len(x) < clusters or len(distinct) < clusters:
        raise ValueError(f"--match-clusters {clusters}: more than the {len(x)} unpaired images or "
                         f"{len(distinct)} distinct unpaired texts")
    first_copy = torch.tensor([c[0] for c in copies])
    counts = torch.tensor([len(c) for c in copies], dtype=torch.float64)
    fx = _unit(features.images)
    fy = _unit(features.texts[first_copy.to(features.texts.device)])
    image_km = KMeans(clusters, n_init=4, random_state=seed).fit(fx)
    text_km = KMeans(clusters, n_init=4, random_state=seed).fit(fy, sample_weight=counts.numpy())
    image_group, text_group = torch.from_numpy(image_km.labels_).long(), torch.from_numpy(text_km.labels_).long()
    anchors = torch.zeros(clusters, clusters, dtype=torch.float64)
    if features.pair_images is not None and len(features.pair_images):
        links = (torch.from_numpy(image_km.predict(_unit(features.pair_images))).long(),
                 torch.from_numpy(text_km.predict(_unit(features.pair_texts))).long())
        anchors.index_put_(links, torch.ones(len(links[0]), dtype=torch.float64), accumulate=True)
    xs, ds = x.detach().double().cpu(), distinct.detach().double().cpu()
    cross = _cross_cost(xs, ds, counts, image_group, text_group, clusters, anchors)
    a = np.bincount(image_group.numpy(), minlength=clusters) / len(x)
    b = np.bincount(text_group.numpy(), weights=counts.numpy(), minlength=clusters) / counts.sum().item()
    layouts = tuple(_relative_cost(_centroids(torch.from_numpy(f), g, clusters, w))
                    for f, g, w in ((fx, image_group, None), (fy, text_group, counts)))
    return ClusterProblem(image_group, text_group, ds, copies, counts, cross.numpy(), layouts, a, b)


@torch.no_grad()
def cluster_matching(x: torch.Tensor, y: torch.Tensor, features: PoolFeatures, clusters: int, structure: float = 0.5,
                     seed: int = 0) -> Matching:
    """Pseudo-pairs between the images x (n, d) and texts y (m, d) (current embeddings, L2-normalised) through
    clusters of their frozen features (`features`).

    Images are split into K = `clusters` groups by k-means on their features, the distinct texts into K groups
    (weighted by their copies); each pair's image and caption fall in the nearest cluster and group, and
    A_cg counts the pairs that link cluster c with group g. With a_c, b_g the groups' shares of the images and
    of the text rows, the cross cost M (`_cross_cost`: from A as far as cluster c has pairs, else from the joint
    space), and the layouts C1_cc' = 1 - <f̄_c, f̄_c'> of the image clusters' mean features, C2_gg' likewise
    for the texts (each scaled to [0, 1]) (`cluster_problem`),
        P = argmin_{P in U(a, b)} (1 - s) <M, P> + s sum_{c,c',g,g'} (C1_cc' - C2_gg')^2 P_cg P_c'g',
    the fused Gromov-Wasserstein plan (Vayer et al., ICML 2019; POT's conditional-gradient solver), s =
    `structure`: 0 matches by M alone, 1 by the layouts alone. Cluster c takes the text group g*(c) =
    argmax_g P_cg; its images are paired with that group's text rows, one row each, the images closest to
    the group's mean embedding first (a group runs out when it has fewer rows than its images).
    `Matching.groups` holds g*, so the images of one group are positives of each other.
    """
    if not 0 <= structure <= 1:
        raise ValueError(f"--match-structure {structure}: must be from 0 to 1")
    pb = cluster_problem(x, y, features, clusters, seed)
    plan = ot.gromov.fused_gromov_wasserstein(pb.cross, *pb.layouts, pb.a, pb.b, alpha=structure)
    partner_group = torch.from_numpy(plan.argmax(1)).long()[pb.image_group]  # (n,) each image's text group
    xs = x.detach().double().cpu()
    closeness = (xs * pb.text_centroids()[partner_group]).sum(1)
    rows = [[row for d in torch.nonzero(pb.text_group == g).flatten().tolist() for row in pb.copies[d]]
            for g in range(clusters)]
    pairs = assign_one_to_one(torch.arange(len(x)), partner_group, closeness.float(), rows)
    pairs.weights = torch.ones(len(pairs.images))
    pairs.groups = partner_group[pairs.images]
    return pairs
