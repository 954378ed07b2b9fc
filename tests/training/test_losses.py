import pytest
import torch
import torch.nn.functional as F

from otclip.training.losses import (
    REGULARIZERS,
    MMCLPseudoPairs,
    StepEmbeddings,
    build_regularizer,
    clip_loss,
    loop_consistency,
    uniformity,
)
from otclip.training.matching import global_matching


def unit(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_clip_loss_prefers_matched_pairs():
    x = unit(32)
    scale = torch.tensor(2.0)
    assert clip_loss(x, x, scale) < clip_loss(x, x[torch.randperm(32)], scale)
    w = torch.ones(32)
    assert torch.allclose(clip_loss(x, x, scale, w), clip_loss(x, x, scale))


def test_loop_penalty_is_zero_when_plans_compose_exactly():
    g = torch.Generator().manual_seed(0)
    P_IA = torch.rand(5, 4, generator=g)
    P_AT = torch.rand(4, 6, generator=g)
    b_A = P_IA.sum(0)
    P_IT = P_IA @ torch.diag(1 / b_A) @ P_AT
    assert float(loop_consistency(P_IA, P_AT, P_IT, b_A)) == pytest.approx(0.0, abs=1e-10)
    assert float(loop_consistency(P_IA, P_AT, P_IT.flip(0), b_A)) > 1e-4


def test_pseudo_pairing_recovers_true_pairs_without_noise():
    x = unit(40, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    rows, cols = MMCLPseudoPairs.select(x @ x[perm].T, 40)
    assert torch.equal(perm[cols], rows)
    match = global_matching(x, x[perm], eps=0.01, min_mass=0.5)
    assert len(match.images) == 40 and torch.equal(perm[match.texts], match.images)


@pytest.mark.parametrize("name", [r for r in REGULARIZERS if r != "none"])
def test_every_regularizer_returns_named_finite_terms_with_gradients(name):
    imgs, txts = unit(48, seed=3).requires_grad_(True), unit(40, seed=4).requires_grad_(True)
    pairs = unit(16, seed=5)
    e = StepEmbeddings(pairs, pairs.clone(), imgs, txts, torch.tensor(2.0),
                       match_images=imgs[:8], match_texts=txts[:8], match_weights=torch.ones(8))
    terms = build_regularizer(name)(e)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert imgs.grad is not None and imgs.grad.abs().sum() > 0


def test_unknown_regularizer_is_named():
    with pytest.raises(ValueError, match="--reg 'ot-magic'"):
        build_regularizer("ot-magic")


def test_uniformity_detects_collapse():
    spread = unit(64, seed=6)
    collapsed = F.normalize(spread * 0.01 + torch.ones(16), dim=1)
    assert uniformity(collapsed) > -0.01 > uniformity(spread)


def test_matching_keeps_class_level_pairs_among_duplicate_texts():
    centers = unit(4, seed=7)
    labels = torch.arange(40) % 4
    x = F.normalize(centers[labels] + 0.05 * unit(40, seed=8), dim=1)
    y = centers[labels[torch.randperm(40, generator=torch.Generator().manual_seed(9))]]  # 10 identical texts per class
    match = global_matching(x, y, eps=0.05)
    assert len(match.images) >= 20 and float(match.weights.max()) == 1.0
    text_labels = (y[match.texts] @ centers.T).argmax(1)
    assert torch.equal(text_labels, labels[match.images])
