"""The σ-only terms of prob-nce (encoders/training/losses_nce.py; not in the papers): each
against a hand-built loop, with gradients reaching log σ² only, and the registry passing them."""
import math

import pytest
import torch

from encoders.training.config import TrainConfig
from encoders.training.losses_baselines import LOSSES
from tests.test_losses_baselines import _gauss, _loop_csd, _loop_rows_ce, _two_captions_each


def test_tempered_prob_nce_scales_each_anchor_row_by_its_own_sigma():
    """temper β: each image's row of logits (i2t) times exp(−β(u_i − ū_img)), each caption's
    row (t2i) times exp(−β(u_t − ū_txt)), u = log Σσ²; the reference rebuilds them by hand."""
    from encoders.training.losses_nce import anchor_temperature, prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 50), _gauss(6, 4, 51)
    matched = _two_captions_each(3)
    csd = [[_loop_csd(im[i].tolist(), iv[i].tolist(), tm[k].tolist(), tv[k].tolist())
            for k in range(6)] for i in range(3)]

    def factors(lv, beta):
        u = [math.log(sum(math.exp(x) for x in row)) for row in lv.tolist()]
        mean = sum(u) / len(u)
        return [math.exp(-beta * (x - mean)) for x in u]

    beta, scale = 0.7, 2.0
    fi, ft = factors(iv, beta), factors(tv, beta)
    i2t = _loop_rows_ce([[-scale * csd[i][k] * fi[i] for k in range(6)] for i in range(3)],
                        matched.tolist())
    t2i = _loop_rows_ce([[-scale * csd[i][k] * ft[k] for i in range(3)] for k in range(6)],
                        matched.T.tolist())
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    out = prob_nce_loss(im, iv, tm, tv, matched, a, b, scale=scale, kl_weight=0.0, n_samples=2,
                        temper=beta)
    assert out["nce"].item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-9)
    assert anchor_temperature(tv, beta).tolist() == pytest.approx(ft, rel=1e-12)
    # the same shift of every log σ² leaves the factors as they were: the tempering learns σ's
    # spread across anchors, never its level
    assert anchor_temperature(tv + 0.3, beta).tolist() == pytest.approx(ft, rel=1e-12)


def test_tempered_hit_loss_by_hand_and_only_sigma_learns_from_it():
    """−log(softmax mass on any positive) of each row at its anchor's temperature, by hand;
    the logits are detached, so μ gets no gradient from it and log σ² does."""
    from encoders.training.losses_nce import anchor_temperature, tempered_hit_loss

    g = torch.Generator().manual_seed(60)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64)
    lv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    matched = _two_captions_each(3)
    kappa = anchor_temperature(lv, 0.5).tolist()
    expected = []
    for row, prow, kp in zip(logits.tolist(), matched.tolist(), kappa):
        z = [math.exp(kp * x) for x in row]
        expected.append(-math.log(sum(e for e, p in zip(z, prow) if p) / sum(z)))
    leaf_logits, leaf_lv = logits.clone().requires_grad_(), lv.clone().requires_grad_()
    got = tempered_hit_loss(leaf_logits, matched, leaf_lv, 0.5)
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    got.backward()
    assert leaf_logits.grad is None and leaf_lv.grad.abs().sum() > 0


def test_failure_loss_by_hand_and_only_sigma_learns_from_it():
    """BCE of "top-1 is not a positive" against sigmoid(logit(rate) + γ(u − ū)), by hand."""
    from encoders.training.losses_nce import FAILURE_GAMMA, failure_loss

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [0.0, 0.1, 0.2], [1.0, 0.0, 0.0]],
                          dtype=torch.float64)
    positives = torch.tensor([[True, False, False], [True, False, False],
                              [False, False, True], [False, False, False]])  # row 4: none
    lv = torch.tensor([[0.0, -1.0], [0.5, 0.2], [-2.0, 1.0], [9.0, 9.0]], dtype=torch.float64)
    wrong = [0.0, 1.0, 0.0]                      # row 2's top-1 (column 1) is not a positive
    u = [math.log(sum(math.exp(x) for x in row)) for row in lv.tolist()[:3]]
    mean = sum(u) / 3
    offset = math.log((1 / 3) / (2 / 3))         # failure rate 1/3
    expected = 0.0
    for y, ui in zip(wrong, u):
        p = 1 / (1 + math.exp(-(offset + FAILURE_GAMMA * (ui - mean))))
        expected -= (y * math.log(p) + (1 - y) * math.log(1 - p)) / 3
    leaf_logits, leaf_lv = logits.clone().requires_grad_(), lv.clone().requires_grad_()
    got = failure_loss(leaf_logits, positives, leaf_lv)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    assert leaf_logits.grad is None
    # descent raises the failure's σ and lowers that of the success predicted to fail most
    assert leaf_lv.grad[1].sum() < 0 < leaf_lv.grad[2].sum()
    assert leaf_lv.grad[3].abs().sum() == 0                     # a row without positives: none


def test_prob_nce_registry_passes_the_sigma_term_options():
    """nce_temper, hit_temper/hit_captions and failure_weight/failure_images reach the loss:
    the registry equals prob_nce_loss called with them, and each option changes the loss."""
    from encoders.training.losses_nce import prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 70), _gauss(6, 4, 71)
    matched = _two_captions_each(3)
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    base = TrainConfig()
    seen = set()
    for options in ({}, {"nce_temper": 0.5}, {"hit_temper": 0.5, "hit_captions": True},
                    {"hit_temper": 0.5, "hit_captions": False},
                    {"failure_weight": 1.0, "failure_images": True},
                    {"failure_weight": 1.0, "failure_images": False}):
        cfg = TrainConfig(**{"nce_temper": 0.0, "hit_temper": 0.0, "failure_weight": 0.0,
                             **options})
        got = LOSSES["prob-nce"](im, iv, tm, tv, matched, a, b, cfg,
                                 generator=torch.Generator().manual_seed(3))["loss"].item()
        ref = prob_nce_loss(im, iv, tm, tv, matched, a, b, scale=base.nce_scale,
                            kl_weight=base.kl_weight, n_samples=base.calib_samples,
                            generator=torch.Generator().manual_seed(3),
                            temper=cfg.nce_temper, hit_temper=cfg.hit_temper,
                            hit_captions=cfg.hit_captions, failure_weight=cfg.failure_weight,
                            failure_images=cfg.failure_images)["loss"].item()
        assert got == pytest.approx(ref, rel=1e-12)
        seen.add(round(got, 12))
        parts = LOSSES["prob-nce"](im, iv, tm, tv, matched, a, b, cfg,
                                   generator=torch.Generator().manual_seed(3))
        assert ("hit" in parts) == bool(cfg.hit_temper)
        assert ("failure" in parts) == bool(cfg.failure_weight)
        total = (parts["nce"] + parts.get("hit", 0.0) + cfg.failure_weight * parts.get("failure", 0.0)
                 + base.kl_weight * parts["kl"] + parts["match_nll"])
        assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    assert len(seen) == 6
