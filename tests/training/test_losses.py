import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from finite_differences import agreement, central_differences

from otclip.training.losses import (
    REGULARIZERS,
    StepEmbeddings,
    build_regularizer,
    clip_loss,
    loop_consistency,
    step_total,
    top_b_pseudo_pair_loss,
    uniformity,
)
from otclip.training.matching import nearest_text_pairs, ot_matching


def unit(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_clip_loss_prefers_matched_pairs():
    x = unit(32)
    scale = torch.tensor(2.0)
    assert clip_loss(x, x, scale) < clip_loss(x, x[torch.randperm(32)], scale)
    w = torch.ones(32)
    assert torch.allclose(clip_loss(x, x, scale, w), clip_loss(x, x, scale))


def test_clip_loss_with_positives_matches_a_brute_force_soft_target_loss():
    x, y = unit(6, seed=7), unit(6, seed=8)
    scale = torch.tensor(1.5)
    keys = [0, 1, 0, 2, 1, 0]
    positives = torch.tensor([[a == b for b in keys] for a in keys])
    s = scale.exp() * x @ y.T
    expected = 0.0
    for m in (s, s.T):  # each direction: -mean over i of the mean over i's positives j of log softmax(m_i)_j
        logp = m.log_softmax(1)
        expected += sum(-sum(logp[i, j] for j in range(6) if keys[i] == keys[j]) / keys.count(keys[i]) for i in range(6)) / 6
    assert float(clip_loss(x, y, scale, positives=positives)) == pytest.approx(float(expected / 2), rel=1e-6)
    assert torch.allclose(clip_loss(x, y, scale, positives=torch.eye(6, dtype=torch.bool)), clip_loss(x, y, scale))


def test_same_label_positives_stop_pulling_an_image_towards_one_of_its_class_captions():
    y = torch.eye(4, 16)  # captions 0, 1 of class A; 2, 3 of class B (different wordings, orthogonal)
    centre = F.normalize(torch.stack([y[0] + y[1], y[0] + y[1], y[2] + y[3], y[2] + y[3]]), dim=1)
    same_label = torch.tensor([[a == b for b in (0, 0, 1, 1)] for a in (0, 0, 1, 1)])
    along = []
    for positives in (None, same_label):
        x = centre.clone().requires_grad_(True)
        clip_loss(x, y, torch.tensor(2.0), positives=positives).backward()
        along.append(float(x.grad[0] @ (y[0] - y[1])))  # < 0: descent moves image 0 to caption 0, off caption 1
    assert along[0] < -1e-3 and abs(along[1]) < 1e-6


def test_loop_penalty_is_zero_when_plans_compose_exactly_and_hellinger_by_hand():
    g = torch.Generator().manual_seed(0)
    P_IA = torch.rand(5, 4, generator=g, dtype=torch.float64)
    P_AT = torch.rand(4, 6, generator=g, dtype=torch.float64)
    P_IT = P_IA @ torch.diag(1 / P_AT.sum(1)) @ P_AT
    assert float(loop_consistency(P_IA, P_AT, P_IT)) == pytest.approx(0.0, abs=1e-12)
    # two anchors, two images, two texts: image i -> anchor i -> text i, against a direct plan that crosses over
    eye = torch.eye(2, dtype=torch.float64) / 2
    crossed = torch.tensor([[0.1, 0.4], [0.4, 0.1]], dtype=torch.float64)
    by_hand = 2 * (0.5 ** 0.5 - 0.1 ** 0.5) ** 2 + 2 * 0.4  # the glued plan is diag(1/2, 1/2)
    assert float(loop_consistency(eye, eye, crossed)) == pytest.approx(by_hand, rel=1e-6)


def test_loop_consistency_does_not_vanish_with_the_batch_size():
    """The old penalty fell as 1 / n^2 (2.5e-3 at 64, 4.2e-5 at 1024): nothing against W's ~0.9."""
    values = []
    for n in (64, 512):
        imgs, txts, anchors = unit(n, seed=1), unit(n, seed=2), unit(32, seed=3)
        e = StepEmbeddings(anchors, anchors.clone(), imgs, txts, torch.tensor(2.0))
        values.append(float(build_regularizer("ot-loop")(e)["ot_loop_consistency"]))
    assert min(values) > 0.05 and max(values) / min(values) < 1.5


def test_loop_consistency_gradient_matches_finite_differences_with_resolved_plans():
    """The term's gradient w.r.t. the unpaired images, against central differences that solve every plan anew
    (the old gradient, at fixed potentials, had cosine 0.21 with this and 6x its norm)."""
    from otclip.training.losses import LoopOT

    imgs, txts, anchors = (unit(n, d=4, seed=s).double() for n, s in ((6, 11), (5, 12), (4, 13)))
    loop = LoopOT(eps=0.2, tol=1e-13)

    def consistency(x):
        return loop(StepEmbeddings(anchors, anchors.flip(0), x, txts, torch.tensor(1.0)))["ot_loop_consistency"]

    x = imgs.clone().requires_grad_(True)
    consistency(x).backward()
    cosine, ratio = agreement(x.grad, central_differences(consistency, imgs))
    assert cosine > 0.9999 and ratio == pytest.approx(1.0, abs=1e-3)


def test_barycenter_term_measures_alignment():
    """Identical image and text batches give ~0, independent ones clearly more (the old term read 1.000 for
    independent and 1.003 for identical batches of 256)."""
    images, texts, anchors = unit(256, d=64, seed=1), unit(256, d=64, seed=2), unit(64, d=64, seed=3)
    shifted = F.normalize(images + 0.5 * texts, dim=1)
    reg = build_regularizer("ot-barycenter")
    value = {name: float(reg(StepEmbeddings(anchors, anchors, images, t, torch.tensor(1.0)))["ot_barycenter"])
             for name, t in (("identical", images.clone()), ("shifted", shifted), ("independent", texts))}
    assert value["identical"] < 1e-3
    assert value["identical"] < value["shifted"] < value["independent"] and value["independent"] > 0.1


def test_barycenter_of_two_points_by_hand():
    """One image at (0, 0), one text at (2, 0): B is the midpoint (1, 0); each divergence is |.|^2 = 1 (a single
    point's plan has no entropy), so the term is 1/2 + 1/2 = 1 = W2^2 / 4; the debiased refinement keeps B."""
    from otclip.training.losses import BarycenterOT

    e = StepEmbeddings(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0.0, 0.0]], dtype=torch.float64),
                       torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor(1.0))
    for refine in (0, 2):
        assert float(BarycenterOT(refine=refine)(e)["ot_barycenter"]) == pytest.approx(1.0, abs=1e-9)


def test_top_b_loss_matches_the_authors_formula_by_brute_force():
    """Nakada et al.'s notebook: the B largest entries of the flattened B x B logits are positives, however
    they fall in rows and columns; log-sum-exp over every row and every column; tau = 1."""
    x, y = unit(5, d=3, seed=1).double(), unit(5, d=3, seed=2).double()
    s = (x @ y.T).tolist()
    entries = sorted((s[i][j] for i in range(5) for j in range(5)), reverse=True)[:5]
    rows = sum(torch.tensor(r, dtype=torch.float64).exp().sum().log() for r in s)
    cols = sum(torch.tensor([s[i][j] for i in range(5)], dtype=torch.float64).exp().sum().log() for j in range(5))
    expected = (-2 * sum(entries) + rows + cols) / (2 * 5)
    assert float(top_b_pseudo_pair_loss(x, y)) == pytest.approx(float(expected), rel=1e-12)


def test_pool_pairings_recover_true_pairs_without_noise():
    x = unit(40, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    for match in (nearest_text_pairs(x, x[perm]), ot_matching(x, x[perm], eps=0.01)):
        assert len(match.images) == 40 and torch.equal(perm[match.texts], match.images)


def test_ot_matching_leaves_images_without_a_partner_out():
    """Half of the images have their partner among the texts; the other texts are unrelated."""
    x = unit(200, d=32, seed=3)
    partners = F.normalize(x[:100] + 0.1 * unit(100, d=32, seed=4), dim=1)
    y = torch.cat([partners, unit(100, d=32, seed=5)])
    match = ot_matching(x, y, eps=0.05)
    correct = match.texts == match.images
    assert float(correct.float().mean()) > 0.85  # precision (0.5 if balanced OT forced a partner on every image)
    assert int(correct.sum()) > 90


def test_ot_matching_min_certainty_keeps_the_images_whose_plan_picks_one_text():
    """Images halfway between two texts (their plan row splits) are left out at --match-min-certainty 0.7 and
    kept, half of them wrongly, at 0; the kept set is the one POT's unbalanced plan gives under the rule."""
    y = unit(60, d=32, seed=11)
    clear = F.normalize(y[:40] + 0.05 * unit(40, d=32, seed=12), dim=1)  # image i's partner is text i
    halfway = F.normalize(y[40:50] + y[50:60], dim=1)  # images 40-49 between texts 40+k and 50+k
    x = torch.cat([clear, halfway])
    loose, strict = ot_matching(x, y, eps=0.05), ot_matching(x, y, eps=0.05, min_certainty=0.7)
    assert (loose.images >= 40).sum() >= 8  # the ambiguous images are matched without the rule ...
    assert sorted(strict.images.tolist()) == list(range(40))  # ... and left out with it
    assert torch.equal(strict.texts, strict.images)
    a, b = np.full(50, 1 / 50), np.full(60, 1 / 60)
    C = (1 - x.double() @ y.double().T).numpy()
    plan = ot.unbalanced.sinkhorn_unbalanced(a, b, C, 0.05, 0.5, stopThr=1e-14, numItermax=20000)
    share, certainty = plan.sum(1) * 50, plan.max(1) / plan.sum(1)
    for c in (0.4, 0.7):
        expected = np.flatnonzero((share >= 0.5) & (certainty >= c))
        got = ot_matching(x, y, eps=0.05, min_certainty=c).images
        assert sorted(got.tolist()) == expected.tolist()


def test_ot_matching_is_one_to_one_across_blocks():
    x = unit(64, seed=6)
    y = F.normalize(x + 0.3 * unit(64, seed=7), dim=1)
    match = ot_matching(x, y, eps=0.05, block=16, min_mass=0.0)
    assert len(set(match.texts.tolist())) == len(match.texts) and len(set(match.images.tolist())) == len(match.images)


def test_schedules():
    c, r = torch.tensor(1.0), {"term": torch.tensor(2.0)}
    assert float(step_total(c, r, 0.5, "joint", first_stage=False)) == 2.0
    assert float(step_total(c, r, 0.5, "after-pairs", first_stage=True)) == 1.0
    assert float(step_total(c, r, 0.5, "after-pairs", first_stage=False)) == 2.0
    assert float(step_total(c, r, 0.5, "two-stage", first_stage=True)) == 1.0
    assert float(step_total(c, r, 0.5, "two-stage", first_stage=False)) == 1.0  # the unpaired term alone


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
    for match in (ot_matching(x, y, eps=0.05), nearest_text_pairs(x, y)):
        assert len(match.images) >= 36 and float(match.weights.max()) == 1.0
        assert len(set(match.texts.tolist())) == len(match.texts)  # each text row once
        text_labels = (y[match.texts] @ centers.T).argmax(1)
        assert torch.equal(text_labels, labels[match.images])


@pytest.mark.parametrize("n_texts", [48, 40])
def test_barycenter_term_solved_as_one_batch_equals_its_problems_solved_one_by_one(n_texts, monkeypatch):
    """The five OT problems of the term stacked by shape (one batch when the batches have one size, two groups
    otherwise): value and gradients as solving each alone."""
    from otclip.training import losses

    images, texts = unit(48, d=8, seed=1), unit(n_texts, d=8, seed=2)

    def run():
        x, y = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        value = losses.BarycenterOT(eps=0.05)(StepEmbeddings(x[:4], y[:4], x, y, torch.tensor(2.0)))["ot_barycenter"]
        value.backward()
        return float(value), x.grad, y.grad

    solve = losses.step_ot_values
    monkeypatch.setattr(losses, "step_ot_values", lambda costs, eps: solve(costs, eps, batched=True))
    batched = run()
    monkeypatch.setattr(losses, "step_ot_values", lambda costs, eps: [
        losses.step_ot(c, eps, max_iter=5000).value for c in costs])
    alone = run()
    # each problem stops at the training tolerance (0.1% of the mass), a batch when its worst one gets there
    assert batched[0] == pytest.approx(alone[0], rel=1e-3)
    for g_batched, g_alone in zip(batched[1:], alone[1:]):
        assert float((g_batched - g_alone).norm()) < 1e-2 * float(g_alone.norm())
