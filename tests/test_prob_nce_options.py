"""prob-nce options beyond the default recipe (all NOT in the papers): weighted positives
(`plausible_weight`) and which σ enters the ranking CE (`nce_score` mu / csd_img), against
hand loops."""
import math

import pytest
import torch

from core.errors import PcmeError
from tests.test_losses_baselines import (_gauss, _loop_csd, _loop_infonce_logits,
                                         _two_captions_each)


def _loop_weighted_rows_ce(logits, weights):
    """Mean over rows with weight of −(weighted mean of log softmax over the row), by hand."""
    losses = []
    for row, wrow in zip(logits, weights):
        if sum(wrow) == 0:
            continue
        lse = math.log(sum(math.exp(x) for x in row))
        losses.append(-sum(w * (x - lse) for x, w in zip(row, wrow)) / sum(wrow))
    return sum(losses) / len(losses)


def test_plausible_weight_weighs_own_pairs_against_other_positives():
    from encoders.training.losses_baselines import own_pairs
    from encoders.training.losses_nce import prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 40), _gauss(6, 4, 41)
    own = _two_captions_each(3)
    assert torch.equal(own_pairs(own), own)
    matched = own.clone()
    matched[0, 2] = matched[2, 1] = True  # two plausible positives beyond the pairs
    assert torch.equal(own_pairs(matched), own)
    with pytest.raises(PcmeError, match="do not split evenly"):
        own_pairs(torch.ones(3, 5, dtype=torch.bool))
    csd = torch.tensor([[_loop_csd(im[i].tolist(), iv[i].tolist(), tm[k].tolist(),
                                   tv[k].tolist()) for k in range(6)] for i in range(3)],
                       dtype=torch.float64)
    logits = (-2.0 * csd).tolist()
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)

    def nce(w):
        return prob_nce_loss(im, iv, tm, tv, matched, a, b, scale=2.0, kl_weight=0.0,
                             n_samples=2, plausible_weight=w)["nce"].item()

    for w in (0.0, 0.25):
        weights = [[(1.0 if own[i, k] else w) if matched[i, k] else 0.0 for k in range(6)]
                   for i in range(3)]
        want = 0.5 * (_loop_weighted_rows_ce(logits, weights)
                      + _loop_weighted_rows_ce([list(c) for c in zip(*logits)],
                                               [list(c) for c in zip(*weights)]))
        assert nce(w) == pytest.approx(want, rel=1e-9)
    # weight 1 is the unweighted multi-positive CE; weight 0 is training on the pairs alone
    assert nce(1.0) == pytest.approx(_loop_infonce_logits(logits, matched), rel=1e-9)
    assert nce(0.0) == pytest.approx(_loop_infonce_logits(logits, own), rel=1e-9)


def test_prob_nce_mu_score_keeps_sigma_out_of_the_ranking_ce():
    from encoders.training.losses_nce import nce_logits, prob_nce_loss

    (im, iv), (tm, tv) = _gauss(3, 4, 50), _gauss(6, 4, 51)
    want = torch.tensor([[-2.0 * sum((im[i, d] - tm[k, d]).item() ** 2 for d in range(4))
                          for k in range(6)] for i in range(3)], dtype=torch.float64)
    assert torch.allclose(nce_logits("mu", im, iv, tm, tv, 2.0), want, rtol=1e-9)
    img_var = torch.tensor([sum(math.exp(v) for v in iv[i].tolist()) for i in range(3)],
                           dtype=torch.float64)
    assert torch.allclose(nce_logits("csd_img", im, iv, tm, tv, 2.0),
                          want - 2.0 * img_var[:, None], rtol=1e-9)
    leaves = [t.clone().requires_grad_() for t in (im, iv, tm, tv)]
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    out = prob_nce_loss(*leaves, _two_captions_each(3), a, b, scale=2.0, score="mu",
                        kl_weight=0.0, n_samples=2)
    out["nce"].backward()
    assert leaves[0].grad is not None and leaves[2].grad is not None
    assert leaves[1].grad is None and leaves[3].grad is None  # σ: no gradient from the ranking
