"""PCME++, InfoNCE and VSE++ against plain Python loops and hand-built batches."""
import math

import pytest
import torch

from encoders.training.losses_baselines import (LOSSES, PROBABILISTIC, infonce_loss, pcmepp_loss,
                                                pseudo_positives,
                                       vsepp_loss)
from core.errors import PcmeError
from encoders.training.config import TrainConfig


def _gauss(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return mu, torch.randn(n, dim, generator=g, dtype=torch.float64) - 2.0


def _two_captions_each(n_img):
    return torch.eye(n_img, dtype=torch.bool).repeat_interleave(2, dim=1)  # [n, 2n]


def _loop_csd(mi, vi, mt, vt):
    return sum((mi[d] - mt[d]) ** 2 + math.exp(vi[d]) + math.exp(vt[d]) for d in range(len(mi)))


def _loop_balanced_bce(logit, label):
    pos = [math.log(1 + math.exp(-x)) for row, lab in zip(logit, label)
           for x, l in zip(row, lab) if l]
    neg = [math.log(1 + math.exp(x)) for row, lab in zip(logit, label)
           for x, l in zip(row, lab) if not l]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def test_pcmepp_equals_plain_loop():
    (im, iv), (tm, tv) = _gauss(3, 4, 0), _gauss(6, 4, 1)
    matched = _two_captions_each(3)
    a, b = 2.0, 3.0
    out = pcmepp_loss(im, iv, tm, tv, matched, torch.tensor(a), torch.tensor(b),
                      pseudo_weight=0.3, kl_weight=0.01)
    csd = [[_loop_csd(im[i].tolist(), iv[i].tolist(), tm[k].tolist(), tv[k].tolist())
            for k in range(6)] for i in range(3)]
    logit = [[-a * c + b for c in row] for row in csd]
    lab = matched.tolist()
    first_cap = [lab[i].index(True) for i in range(3)]                  # image i's GT caption
    first_img = [[lab[j][k] for j in range(3)].index(True) for k in range(6)]  # caption k's GT
    rows = [[not lab[i][k] and csd[i][k] <= csd[i][first_cap[i]] for k in range(6)]
            for i in range(3)]
    cols = [[not lab[i][k] and csd[i][k] <= csd[first_img[k]][k] for k in range(6)]
            for i in range(3)]
    kl = sum(0.5 * (math.exp(v) + m * m - 1 - v) for mu, lv in ((im, iv), (tm, tv))
             for r in range(len(mu)) for m, v in zip(mu[r].tolist(), lv[r].tolist())) / 9
    bce = _loop_balanced_bce(logit, lab)
    relabel = [[[lab[i][k] or side[i][k] for k in range(6)] for i in range(3)]
               for side in (rows, cols)]
    pseudo_bce = 0.5 * sum(_loop_balanced_bce(logit, r) for r in relabel)
    n_pseudo = sum(map(sum, rows)) + sum(map(sum, cols))
    assert out["n_pseudo"].item() == n_pseudo > 0  # the pseudo term is exercised
    assert out["bce"].item() == pytest.approx(bce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(bce + 0.3 * pseudo_bce + 0.01 * kl, rel=1e-9)


def test_pcmepp_uniform_weighting_is_the_mean_over_all_pairs():
    (im, iv), (tm, tv) = _gauss(3, 4, 0), _gauss(6, 4, 1)
    matched = _two_captions_each(3)
    out = pcmepp_loss(im, iv, tm, tv, matched, torch.tensor(2.0), torch.tensor(3.0),
                      pseudo_weight=0.0, kl_weight=0.0, balanced=False)
    logit = [[-2.0 * _loop_csd(im[i].tolist(), iv[i].tolist(), tm[k].tolist(), tv[k].tolist())
              + 3.0 for k in range(6)] for i in range(3)]
    terms = [math.log(1 + math.exp(-x if l else x)) for row, lab in zip(logit, matched.tolist())
             for x, l in zip(row, lab)]
    assert out["loss"].item() == pytest.approx(sum(terms) / 18, rel=1e-9)


def test_pseudo_positives_by_hand():
    # 2 images, 3 captions; captions 0, 1 belong to image 0 (caption 0 is its ground truth),
    # caption 2 to image 1.
    matched = torch.tensor([[True, True, False], [False, False, True]])
    csd = torch.tensor([[1.0, 3.0, 2.5],    # image 0: GT caption at 1.0 -> caption 2 (2.5) not
                        [2.0, 4.0, 1.5]])   # image 1: GT caption at 1.5 -> 2.0, 4.0 not
    rows, cols = pseudo_positives(csd, matched)
    assert not rows.any()
    # caption side: caption 0's image at 1.0 -> image 1 (2.0) not; caption 1's at 3.0 ->
    # image 1 (4.0) not; caption 2's at 1.5 -> image 0 (2.5) not.
    assert not cols.any()
    # image 0's GT caption far (5.0): caption 2 (0.2) is a row pseudo-positive; caption 1
    # (a true match, 0.1) is never relabelled. Caption 0 (own image at 5.0): image 1 (4.0) is
    # a column pseudo-positive, from the caption side only.
    csd2 = torch.tensor([[5.0, 0.1, 0.2], [4.0, 9.0, 0.1]])
    rows, cols = pseudo_positives(csd2, matched)
    assert torch.equal(rows, torch.tensor([[False, False, True], [False, False, False]]))
    assert torch.equal(cols, torch.tensor([[False, False, False], [True, False, False]]))


def _loop_infonce(im, tm, matched, scale):
    def direction(sim, pos):
        losses = []
        for row, prow in zip(sim, pos):
            if not any(prow):
                continue
            lse = math.log(sum(math.exp(scale * s) for s in row))
            terms = [scale * s - lse for s, p in zip(row, prow) if p]
            losses.append(-sum(terms) / len(terms))
        return sum(losses) / len(losses)
    sim = [[sum(x * y for x, y in zip(im[i], tm[k])) for k in range(len(tm))]
           for i in range(len(im))]
    sim_t = [list(col) for col in zip(*sim)]
    pos = matched.tolist()
    return 0.5 * (direction(sim, pos) + direction(sim_t, [list(c) for c in zip(*pos)]))


def test_infonce_equals_plain_loop_with_several_captions_per_image():
    (im, _), (tm, _) = _gauss(3, 5, 2), _gauss(6, 5, 3)
    matched = _two_captions_each(3)
    out = infonce_loss(im, tm, matched, logit_scale=10.0)
    ref = _loop_infonce(im.tolist(), tm.tolist(), matched, 10.0)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-9)


def test_infonce_one_to_one_equals_torch_cross_entropy():
    (im, _), (tm, _) = _gauss(5, 8, 4), _gauss(5, 8, 5)
    logits = 7.0 * im @ tm.T
    target = torch.arange(5)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                 + torch.nn.functional.cross_entropy(logits.T, target))
    out = infonce_loss(im, tm, torch.eye(5, dtype=torch.bool), 7.0)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-12)


def _loop_vsepp(im, tm, matched, margin):
    sim = [[sum(x * y for x, y in zip(im[i], tm[k])) for k in range(len(tm))]
           for i in range(len(im))]
    pos = matched.tolist()
    i2t, t2i = [], []
    for i in range(len(im)):
        for k in range(len(tm)):
            if not pos[i][k]:
                continue
            hard_t = max(sim[i][kk] for kk in range(len(tm)) if not pos[i][kk])
            hard_i = max(sim[ii][k] for ii in range(len(im)) if not pos[ii][k])
            i2t.append(max(0.0, margin - sim[i][k] + hard_t))
            t2i.append(max(0.0, margin - sim[i][k] + hard_i))
    return sum(i2t) / len(i2t) + sum(t2i) / len(t2i)


def test_vsepp_equals_plain_loop():
    (im, _), (tm, _) = _gauss(4, 6, 6), _gauss(8, 6, 7)
    matched = _two_captions_each(4)
    out = vsepp_loss(im, tm, matched, margin=0.5)
    assert out["loss"].item() == pytest.approx(_loop_vsepp(im.tolist(), tm.tolist(), matched,
                                                           0.5), rel=1e-9)


def test_vsepp_picks_the_hardest_negative_by_hand():
    # s = [[0.9, 0.8, 0.1], [0.3, 0.2, 0.7]] with image 0 <-> captions 0, 1; image 1 <-> 2.
    im = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tm = torch.tensor([[0.9, 0.3], [0.8, 0.2], [0.1, 0.7]])
    matched = torch.tensor([[True, True, False], [False, False, True]])
    out = vsepp_loss(im, tm, matched, margin=0.2)
    # image 0's hardest negative is caption 2 (0.1): hinges 0.2−0.9+0.1 < 0, 0.2−0.8+0.1 < 0.
    # image 1's hardest negative is caption 0 (0.3), not caption 1 (0.2): 0.2−0.7+0.3 < 0 too.
    # caption 0's hardest negative image: 1 (0.3) -> 0; caption 1: image 1 (0.2) -> 0;
    # caption 2: image 0 (0.1) -> 0.  Shrink the margin's room: raise caption 2 toward image 0.
    assert out["loss"].item() == pytest.approx(0.0)
    tm2 = tm.clone()
    tm2[2] = torch.tensor([0.6, 0.7])  # s(0,2) = 0.6, s(1,2) = 0.7
    out2 = vsepp_loss(im, tm2, matched, margin=0.2)
    # i2t: image 0 pairs (0.9, 0.8) vs hardest 0.6: [0.2−0.9+0.6]₊ = 0, [0.2−0.8+0.6]₊ = 0;
    #      image 1 pair 0.7 vs hardest 0.3 -> 0.  t2i: caption 2 (0.7) vs image 0 (0.6): 0.1;
    #      caption 0 (0.9) vs 0.3, caption 1 (0.8) vs 0.2 -> 0.  Means over 3 pairs.
    assert out2["t2i"].item() == pytest.approx(0.1 / 3)
    assert out2["i2t"].item() == pytest.approx(0.0, abs=1e-7)
    assert out2["hard_neg_sim"].item() == pytest.approx((0.6 + 0.3 + 0.3 + 0.2 + 0.6) / 5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_mu_and_log_var_of_probabilistic_losses(name):
    (im, iv), (tm, tv) = _gauss(3, 4, 8), _gauss(6, 4, 9)
    leaves = [t.clone().requires_grad_() for t in (im, iv, tm, tv)]
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    cfg = TrainConfig(n_samples=3)
    LOSSES[name](*leaves, _two_captions_each(3), a, b, cfg,
                 generator=torch.Generator().manual_seed(0))["loss"].backward()
    for t in (leaves[0], leaves[2]):
        assert t.grad is not None and t.grad.abs().sum() > 0
    probabilistic = name in PROBABILISTIC
    for t in (leaves[1], leaves[3]):
        assert (t.grad is not None and t.grad.abs().sum() > 0) == probabilistic


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matched_batch_scores_lower_than_shuffled(name):
    g = torch.Generator().manual_seed(10)
    im = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    tm = torch.nn.functional.normalize(im + 0.1 * torch.randn(8, 16, generator=g), dim=1)
    lv = torch.full((8, 16), -6.0)
    perm = torch.roll(torch.arange(8), 1)  # every caption moves to another image
    cfg = TrainConfig(n_samples=4)
    eye = torch.eye(8, dtype=torch.bool)
    args = (torch.tensor(5.0), torch.tensor(2.0), cfg)
    good = LOSSES[name](im, lv, tm, lv, eye, *args, generator=torch.Generator().manual_seed(0))["loss"]
    bad = LOSSES[name](im, lv, tm[perm], lv, eye, *args,
                       generator=torch.Generator().manual_seed(0))["loss"]
    assert good < bad


def test_infonce_registry_uses_fixed_temperature_or_a():
    (im, _), (tm, _) = _gauss(4, 5, 11), _gauss(4, 5, 12)
    eye = torch.eye(4, dtype=torch.bool)
    a = torch.tensor(6.0, dtype=torch.float64)
    via_a = LOSSES["infonce"](im, im, tm, tm, eye, a, None, TrainConfig())["loss"]
    assert via_a.item() == pytest.approx(infonce_loss(im, tm, eye, 6.0)["loss"].item())
    fixed = LOSSES["infonce"](im, im, tm, tm, eye, a, None,
                              TrainConfig(temperature=0.1))["loss"]
    assert fixed.item() == pytest.approx(infonce_loss(im, tm, eye, 10.0)["loss"].item())


def test_bad_shapes_raise():
    (im, iv), (tm, tv) = _gauss(3, 4, 0), _gauss(3, 4, 1)
    with pytest.raises(PcmeError, match="matched"):
        pcmepp_loss(im, iv, tm, tv, torch.eye(2, dtype=torch.bool), torch.tensor(1.0),
                    torch.tensor(0.0))
    with pytest.raises(PcmeError, match="same D"):
        infonce_loss(im, tm[:, :3], torch.eye(3, dtype=torch.bool), 1.0)
    with pytest.raises(PcmeError, match="no matched"):
        vsepp_loss(im, tm, torch.zeros(3, 3, dtype=torch.bool))


def test_prob_nce_is_infonce_over_csd_plus_the_detached_match_likelihood():
    from encoders.training.losses import pcme_loss
    from encoders.training.losses_nce import prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 30), _gauss(6, 4, 31)
    matched = _two_captions_each(3)
    csd = torch.tensor([[_loop_csd(im[i].tolist(), iv[i].tolist(), tm[k].tolist(),
                                   tv[k].tolist()) for k in range(6)] for i in range(3)],
                       dtype=torch.float64)
    # InfoNCE over −2·CSD is the loop InfoNCE over similarities −CSD at scale 2
    nce = _loop_infonce_logits((-2.0 * csd).tolist(), matched)
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    out = prob_nce_loss(im, iv, tm, tv, matched, a, b, scale=2.0, kl_weight=0.0, n_samples=3,
                        generator=torch.Generator().manual_seed(5))
    match = pcme_loss(im, iv, tm, tv, matched, a, b, 3, kl_weight=0.0,
                      generator=torch.Generator().manual_seed(5))["nll"]
    assert out["nce"].item() == pytest.approx(nce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(nce + match.item(), rel=1e-9)
    # with pcme_weight 0 the match likelihood trains a and b only, not the embeddings
    leaves = [t.clone().requires_grad_() for t in (im, iv, tm, tv)]
    a.requires_grad_()
    prob_nce_loss(*leaves, matched, a, b, scale=2.0, kl_weight=0.0, n_samples=3)["match_nll"].backward()
    assert a.grad is not None and all(t.grad is None for t in leaves)


def _loop_infonce_logits(logits, matched):
    pos = matched.tolist()
    cols = [list(c) for c in zip(*logits)]
    return 0.5 * (_loop_rows_ce(logits, pos) + _loop_rows_ce(cols, [list(c) for c in zip(*pos)]))


def test_anchor_mean_by_hand():
    from encoders.training.losses import anchor_mean

    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, True]])
    # rows: mean(1, 2) = 1.5, mean(6) = 6 -> 3.75; columns: 1, 2, 6 -> 3; both: 3.375
    assert anchor_mean(values, mask).item() == pytest.approx(3.375)


@pytest.mark.parametrize("pcme_weight", [0.0, 0.5])
def test_prob_nce_registry_calibrates_with_calib_samples_and_trains_with_n_samples(pcme_weight):
    """a, b alone (pcme_weight 0) are fitted with calib_samples per item; PCME's likelihood as
    a loss term (pcme_weight > 0) keeps n_samples."""
    from encoders.training.losses_nce import prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 40), _gauss(6, 4, 41)
    matched = _two_captions_each(3)
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    cfg = TrainConfig(n_samples=5, calib_samples=2, pcme_weight=pcme_weight)
    got = LOSSES["prob-nce"](im, iv, tm, tv, matched, a, b, cfg,
                             generator=torch.Generator().manual_seed(3))["match_nll"]
    for j, expected in ((2, pcme_weight == 0), (5, pcme_weight > 0)):
        ref = prob_nce_loss(im, iv, tm, tv, matched, a, b, scale=cfg.nce_scale, n_samples=j,
                            pcme_weight=pcme_weight,
                            generator=torch.Generator().manual_seed(3))["match_nll"]
        assert (got.item() == pytest.approx(ref.item(), rel=1e-12)) == expected


def _loop_rows_ce(logits, positives):
    """Mean over rows of −(mean over the row's positives of log softmax), by hand."""
    losses = []
    for row, prow in zip(logits, positives):
        lse = math.log(sum(math.exp(x) for x in row))
        terms = [x - lse for x, p in zip(row, prow) if p]
        losses.append(-sum(terms) / len(terms))
    return sum(losses) / len(losses)

