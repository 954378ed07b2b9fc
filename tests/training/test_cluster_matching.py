"""ot-cluster's pairing: clusters of images matched to clusters of texts by their layouts and by the pairs, checked
against categories built so that the right answer is known (and, for the layout, the unique optimum by brute force)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otclip.training.cluster_matching import cluster_matching
from otclip.training.matching import PoolFeatures

K = 4
IMAGES_PER_CATEGORY = (30, 20, 25, 15)
# four category centres with distinct pairwise distances, so that the layout has no symmetry to confuse
CENTRES = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0], [4.5, 4.0]], dtype=torch.float64)


def embed_layout(centres: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """The centres placed in `dim` dimensions by a random rotation, shifted off the origin (normalised later)."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    padded = torch.cat([centres, torch.zeros(len(centres), dim - centres.shape[1], dtype=torch.float64)], 1)
    return padded @ q.T + 10.0 * q[:, -1]


def pool(text_rows=IMAGES_PER_CATEGORY, wrong_joint=True, seed=0):
    """Images and texts of K categories. Frozen features: each modality's own rotation of one layout. Current
    embeddings: image c sits at the text embedding of category c + 1 (a joint space that points the wrong way)."""
    g = torch.Generator().manual_seed(seed)
    image_cat = torch.cat([torch.full((n,), c) for c, n in enumerate(IMAGES_PER_CATEGORY)])
    fx = embed_layout(CENTRES, 8, 1)[image_cat] + 0.05 * torch.randn(len(image_cat), 8, generator=g, dtype=torch.float64)
    paraphrases = embed_layout(CENTRES, 10, 2).repeat_interleave(3, 0) + 0.05 * torch.randn(3 * K, 10, generator=g,
                                                                                            dtype=torch.float64)
    rows = [3 * c + (i % 3) for c, n in enumerate(text_rows) for i in range(n)]  # 3 distinct captions a category
    text_cat = torch.tensor(rows) // 3
    fy = paraphrases[rows]
    joint = F.normalize(torch.randn(K, 6, generator=g, dtype=torch.float64), dim=1)
    shift = 1 if wrong_joint else 0
    noise = 0.05 * torch.randn(len(image_cat), 6, generator=g, dtype=torch.float64)
    x = F.normalize(joint[(image_cat + shift) % K] + noise, dim=1)
    y = F.normalize(joint[text_cat] + 0.05 * torch.randn(K, 3, 6, generator=g, dtype=torch.float64)
                    .reshape(3 * K, 6)[rows], dim=1)
    return x.float(), y.float(), fx.float(), fy.float(), image_cat, text_cat


def precision(m, image_cat, text_cat) -> float:
    return float((image_cat[m.images] == text_cat[m.texts]).float().mean())


def test_the_layout_is_the_unique_brute_force_optimum():
    """The premise of the next test, computed independently: over all K! ways to map categories to categories, the
    Gromov-Wasserstein cost sum (D1_cc' - D2_pi(c)pi(c'))^2 of the two feature layouts is least for the truth."""
    x, y, fx, fy, image_cat, text_cat = pool()

    def layout(f, cat):
        c = np.stack([F.normalize(f[cat == k].double(), dim=1).mean(0).numpy() for k in range(K)])
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        d = 1 - c @ c.T
        return d / d.max()

    d1, d2 = layout(fx, image_cat), layout(fy, text_cat)
    cost = {p: sum((d1[i, j] - d2[p[i], p[j]]) ** 2 for i in range(K) for j in range(K))
            for p in itertools.permutations(range(K))}
    ranked = sorted(cost, key=cost.get)
    assert ranked[0] == tuple(range(K)) and cost[ranked[1]] > cost[ranked[0]] + 0.05


def test_the_layouts_find_the_categories_where_the_joint_space_points_the_wrong_way():
    x, y, fx, fy, image_cat, text_cat = pool()
    by_joint = cluster_matching(x, y, PoolFeatures(fx, fy), K, structure=0.0)
    assert precision(by_joint, image_cat, text_cat) == 0.0  # every image given the next category's text
    by_layout = cluster_matching(x, y, PoolFeatures(fx, fy), K, structure=1.0)
    assert precision(by_layout, image_cat, text_cat) == 1.0 and len(by_layout.images) == len(x)


def test_pairs_say_which_text_group_their_images_cluster_belongs_to():
    """One pair in each of three categories outweighs the wrong joint space (structure 0: no layouts); the fourth
    category, with no pair, takes the group left over (each group holds as many text rows as it has images)."""
    x, y, fx, fy, image_cat, text_cat = pool()
    first_image = [int(torch.nonzero(image_cat == c)[0]) for c in range(3)]
    first_text = [int(torch.nonzero(text_cat == c)[0]) for c in range(3)]
    features = PoolFeatures(fx, fy, fx[first_image], fy[first_text])
    m = cluster_matching(x, y, features, K, structure=0.0)
    assert precision(m, image_cat, text_cat) == 1.0 and len(m.images) == len(x)


def test_a_stray_pair_does_not_send_a_cluster_without_pairs_to_its_group():
    """Every image of categories 0-2 has a pair (one a pool image); category 3 has none, but one pair of category 1
    whose image k-means puts among category 3's images (a stray: clusters are not pure). One vote where a cluster
    of its size would hold 15 must not outweigh the joint space, which places category 3 right (structure 0: the
    cross cost alone; its joint cost to group 1 is 0.29 of the matrix's range). Text group 1 has room for both
    clusters, so a cost that trusted the vote would send all of category 3 there."""
    x, y, fx, fy, image_cat, text_cat = pool((30, 60, 25, 15), wrong_joint=False)
    pair_images = [int(i) for c in range(3) for i in torch.nonzero(image_cat == c)]
    pair_texts = [int(t) for c, n in enumerate(IMAGES_PER_CATEGORY[:3]) for t in torch.nonzero(text_cat == c)[:n]]
    pair_images.append(int(torch.nonzero(image_cat == 3)[0]))  # the stray: an image among category 3's...
    pair_texts.append(int(torch.nonzero(text_cat == 1)[-1]))  # ...with a caption of category 1
    features = PoolFeatures(fx, fy, fx[pair_images], fy[pair_texts])
    m = cluster_matching(x, y, features, K, structure=0.0)
    assert precision(m, image_cat, text_cat) == 1.0 and len(m.images) == len(x)


def test_pairs_are_one_to_one_grouped_and_closest_first_where_texts_run_short():
    short = (10, 20, 25, 15)  # category 0: 30 images, 10 text rows
    x, y, fx, fy, image_cat, text_cat = pool(short, wrong_joint=False)
    m = cluster_matching(x, y, PoolFeatures(fx, fy), K, structure=0.5)
    assert len(set(m.images.tolist())) == len(m.images) and len(set(m.texts.tolist())) == len(m.texts)
    assert precision(m, image_cat, text_cat) == 1.0
    groups = m.groups.tolist()
    assert all((m.groups == g).sum() == short[int(text_cat[t])] for g, t in zip(groups, m.texts.tolist()))
    # a group's members are positives of each other: one group id per category, a different one for each
    ids: dict[int, set] = {}
    for i, g in zip(m.images.tolist(), groups):
        ids.setdefault(int(image_cat[i]), set()).add(g)
    assert all(len(s) == 1 for s in ids.values()) and len(set().union(*ids.values())) == K
    kept = set(m.images[image_cat[m.images] == 0].tolist())
    # closest first: the kept images of category 0 are its 10 most similar to the category's mean text embedding
    distinct = torch.unique(y[text_cat == 0].double(), dim=0)
    copies = torch.tensor([int((y[text_cat == 0].double() == d).all(1).sum()) for d in distinct], dtype=torch.float64)
    mean = F.normalize((copies[:, None] * distinct).sum(0), dim=0)
    candidates = torch.nonzero(image_cat == 0).flatten()
    expected = candidates[(x[candidates].double() @ mean).topk(10).indices]
    assert kept == set(expected.tolist())


def test_bad_settings_name_their_flag():
    x, y, fx, fy, *_ = pool()
    with pytest.raises(ValueError, match="--match-clusters 13: more than the 60 unpaired images or 12 distinct"):
        cluster_matching(x[:60], y, PoolFeatures(fx[:60], fy), 13)
    with pytest.raises(ValueError, match="--match-structure 1.5"):
        cluster_matching(x, y, PoolFeatures(fx, fy), K, structure=1.5)
