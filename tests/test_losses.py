"""PCME loss against plain Python loops, closed forms and Monte-Carlo estimates."""
import math

import numpy as np
import pytest
import torch

from encoders.training.losses import (kl_to_standard_normal, match_log_probs, pcme_loss,
                             sample_embeddings, uniformity)
from core.errors import PcmeError


def _batch(n, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, dim, generator=g, dtype=dtype)
    log_var = torch.randn(n, dim, generator=g, dtype=dtype) - 1.0
    return mu, log_var


def _loop_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, img_eps, txt_eps):
    """The PCME NLL written as plain loops over pairs and samples, in float64."""
    n_img, n_samples, dim = img_eps.shape
    pos, neg = [], []
    for i in range(n_img):
        for k in range(txt_mu.shape[0]):
            probs = []
            for j in range(n_samples):
                for jj in range(n_samples):
                    dist_sq = 0.0
                    for d in range(dim):
                        z_i = img_mu[i, d] + math.exp(0.5 * img_lv[i, d]) * img_eps[i, j, d]
                        z_k = txt_mu[k, d] + math.exp(0.5 * txt_lv[k, d]) * txt_eps[k, jj, d]
                        dist_sq += (z_i - z_k) ** 2
                    probs.append(1.0 / (1.0 + math.exp(a * math.sqrt(dist_sq) - b)))
            p = sum(probs) / len(probs)
            (pos if matched[i, k] else neg).append(-math.log(p) if matched[i, k]
                                                   else -math.log(1.0 - p))
    return sum(pos) / len(pos) + sum(neg) / len(neg)


def _loop_kl(mu, lv):
    return sum(0.5 * sum(math.exp(lv[i, d]) + mu[i, d] ** 2 - 1 - lv[i, d]
                         for d in range(mu.shape[1])) for i in range(mu.shape[0]))


def test_loss_equals_plain_loop_with_fixed_noise():
    (img_mu, img_lv), (txt_mu, txt_lv) = _batch(3, 4, seed=0), _batch(3, 4, seed=1)
    matched = torch.eye(3, dtype=torch.bool)
    a, b = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    out = pcme_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, n_samples=2,
                    kl_weight=0.1, generator=torch.Generator().manual_seed(7))
    # the same noise, redrawn in the documented order: images first, then captions
    g = torch.Generator().manual_seed(7)
    img_eps = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    txt_eps = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    args = [t.numpy() for t in (img_mu, img_lv, txt_mu, txt_lv)]
    nll = _loop_loss(*args, matched.numpy(), 2.0, 1.0, img_eps.numpy(), txt_eps.numpy())
    kl = (_loop_kl(args[0], args[1]) + _loop_kl(args[2], args[3])) / 6
    assert abs(out["nll"].item() - nll) < 1e-5
    assert abs(out["loss"].item() - (nll + 0.1 * kl)) < 1e-5
    again = pcme_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, n_samples=2,
                      kl_weight=0.1, img_eps=img_eps, txt_eps=txt_eps)
    assert abs(again["loss"].item() - out["loss"].item()) < 1e-12


def test_loss_equals_loop_for_float32_and_non_square_batch():
    (img_mu, img_lv), (txt_mu, txt_lv) = _batch(2, 4, seed=2), _batch(3, 4, seed=3)
    matched = torch.tensor([[True, True, False], [False, False, True]])
    g = torch.Generator().manual_seed(8)
    img_eps, txt_eps = torch.randn(2, 3, 4, generator=g), torch.randn(3, 3, 4, generator=g)
    out = pcme_loss(*(t.float() for t in (img_mu, img_lv, txt_mu, txt_lv)), matched,
                    torch.tensor(3.0), torch.tensor(2.0), 3, img_eps=img_eps, txt_eps=txt_eps)
    nll = _loop_loss(img_mu.float().double().numpy(), img_lv.float().double().numpy(),
                     txt_mu.float().double().numpy(), txt_lv.float().double().numpy(),
                     matched.numpy(), 3.0, 2.0, img_eps.double().numpy(),
                     txt_eps.double().numpy())
    assert abs(out["nll"].item() - nll) < 1e-5


def test_gradients_reach_log_var_a_and_b():
    img_mu, img_lv = _batch(4, 6, seed=4, dtype=torch.float32)
    txt_mu, txt_lv = _batch(4, 6, seed=5, dtype=torch.float32)
    for t in (img_mu, img_lv, txt_mu, txt_lv):
        t.requires_grad_(True)
    raw_a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    out = pcme_loss(img_mu, img_lv, txt_mu, txt_lv, torch.eye(4, dtype=torch.bool),
                    torch.nn.functional.softplus(raw_a), b, n_samples=5,
                    uniformity_weight=0.1, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    for t in (img_mu, img_lv, txt_mu, txt_lv, raw_a, b):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_loss_is_finite_for_identical_samples():
    # coinciding samples (‖z − z'‖ = 0), where the derivative of ‖·‖ is undefined
    mu = torch.randn(2, 3, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    log_var = torch.full((2, 3), -200.0, requires_grad=True)  # σ underflows: z == μ
    out = pcme_loss(mu, log_var, mu, log_var, torch.eye(2, dtype=torch.bool),
                    torch.tensor(5.0), torch.tensor(0.0), 2, generator=torch.Generator())
    out["loss"].backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_var.grad).all()


def test_match_probability_converges_to_independent_monte_carlo():
    a, b = 3.0, 2.0
    (img_mu, img_lv), (txt_mu, txt_lv) = _batch(1, 3, seed=5), _batch(1, 3, seed=6)
    rng = np.random.default_rng(0)
    n = 1_000_000  # independent (z_img, z_txt) pairs
    z_i = img_mu.numpy() + np.exp(0.5 * img_lv.numpy()) * rng.standard_normal((n, 3))
    z_t = txt_mu.numpy() + np.exp(0.5 * txt_lv.numpy()) * rng.standard_normal((n, 3))
    probs = 1.0 / (1.0 + np.exp(a * np.linalg.norm(z_i - z_t, axis=1) - b))
    ref, ref_se = probs.mean(), probs.std() / math.sqrt(n)
    rmse, estimates = [], None
    for n_samples in (2, 8, 32):
        estimates = []
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            z_img = sample_embeddings(img_mu, img_lv, n_samples, g)
            z_txt = sample_embeddings(txt_mu, txt_lv, n_samples, g)
            estimates.append(match_log_probs(z_img, z_txt, a, b)[0].exp().item())
        estimates = np.array(estimates)
        rmse.append(np.sqrt(((estimates - ref) ** 2).mean()))
    assert rmse[0] > rmse[1] > rmse[2]
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - ref) < 4 * math.hypot(se, ref_se)


def test_log_probs_are_complementary_and_stable():
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_p, log_not_p = match_log_probs(z, z * 50, 10.0, -5.0)  # p far below float eps
    torch.testing.assert_close(log_p.exp() + log_not_p.exp(), torch.ones(3, 3, dtype=z.dtype))
    assert torch.isfinite(log_p).all() and (log_p < -50).all()


def test_kl_matches_torch_distributions():
    mu, log_var = _batch(5, 4, seed=9)
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, prior).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mu, log_var), ref)


def test_uniformity_matches_pair_loop():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms = [math.exp(-2 * ((z[i] - z[j]) ** 2).sum().item())
             for i in range(5) for j in range(i + 1, 5)]
    assert abs(uniformity(z).item() - math.log(sum(terms) / len(terms))) < 1e-12


def test_matching_batch_scores_better_than_shuffled():
    mu = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator()
                                                   .manual_seed(3)), dim=-1)
    log_var = torch.full((6, 8), -6.0)
    matched = torch.eye(6, dtype=torch.bool)
    args = dict(a=torch.tensor(5.0), b=torch.tensor(2.0), n_samples=4)
    good = pcme_loss(mu, log_var, mu, log_var, matched,
                     generator=torch.Generator().manual_seed(0), **args)
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    bad = pcme_loss(mu, log_var, mu[perm], log_var, matched,
                    generator=torch.Generator().manual_seed(0), **args)
    assert good["loss"] < bad["loss"]
    assert good["pos_prob"] > good["neg_prob"]
    assert bad["pos_prob"] < good["pos_prob"]


def test_uniformity_weight_zero_skips_and_adds_nothing():
    (img_mu, img_lv), (txt_mu, txt_lv) = _batch(3, 4, seed=10), _batch(3, 4, seed=12)
    kwargs = dict(matched=torch.eye(3, dtype=torch.bool), a=torch.tensor(2.0),
                  b=torch.tensor(1.0), n_samples=3, kl_weight=0.0)
    off = pcme_loss(img_mu, img_lv, txt_mu, txt_lv, generator=torch.Generator().manual_seed(1),
                    **kwargs)
    on = pcme_loss(img_mu, img_lv, txt_mu, txt_lv, generator=torch.Generator().manual_seed(1),
                   uniformity_weight=0.5, **kwargs)
    assert off["uniformity"] == 0 and off["loss"] == off["nll"]
    g = torch.Generator().manual_seed(1)
    z = torch.cat([sample_embeddings(img_mu, img_lv, 3, g),
                   sample_embeddings(txt_mu, txt_lv, 3, g)])
    torch.testing.assert_close(on["uniformity"], uniformity(z.flatten(0, 1)))
    torch.testing.assert_close(on["loss"], on["nll"] + 0.5 * on["uniformity"])


def test_bad_inputs_raise():
    mu, lv = _batch(3, 4, seed=11)
    eye = torch.eye(3, dtype=torch.bool)
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(PcmeError, match="matched"):
        pcme_loss(mu, lv, mu, lv, eye.float(), one, zero, 2)
    with pytest.raises(PcmeError, match="matched"):
        pcme_loss(mu, lv, mu[:2], lv[:2], eye, one, zero, 2)
    with pytest.raises(PcmeError, match="dim"):
        pcme_loss(mu, lv, mu[:, :3], lv[:, :3], eye, one, zero, 2)
    with pytest.raises(PcmeError, match="log_var"):
        pcme_loss(mu, lv[:, :3], mu, lv, eye, one, zero, 2)
    with pytest.raises(PcmeError, match="n_samples"):
        pcme_loss(mu, lv, mu, lv, eye, one, zero, 0)
    with pytest.raises(PcmeError, match="eps"):
        sample_embeddings(mu, lv, 2, eps=torch.zeros(3, 3, 4))
    with pytest.raises(PcmeError, match="same J"):
        match_log_probs(torch.zeros(3, 2, 4), torch.zeros(3, 3, 4), 1.0, 0.0)


def test_label_log_likelihood_picks_log_p_or_log_not_p():
    from encoders.training.losses import label_log_likelihood, match_log_probs

    g = torch.Generator().manual_seed(3)
    z_img, z_txt = torch.randn(4, 3, 6, generator=g), torch.randn(10, 3, 6, generator=g)
    matched = torch.rand(4, 10, generator=g) < 0.3
    a, b = torch.tensor(2.0), torch.tensor(1.5)
    log_p, log_not_p = match_log_probs(z_img, z_txt, a, b)
    expected = torch.where(matched, log_p, log_not_p)
    torch.testing.assert_close(label_log_likelihood(z_img, z_txt, a, b, matched), expected)


def test_unbalanced_weighting_is_the_mean_over_all_pairs():
    from encoders.training.losses import match_log_probs, sample_embeddings

    g = torch.Generator().manual_seed(5)
    mu_i, mu_t = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    lv_i, lv_t = torch.randn(3, 4, generator=g) - 2, torch.randn(6, 4, generator=g) - 2
    matched = torch.eye(3, dtype=torch.bool).repeat_interleave(2, dim=1)
    a, b = torch.tensor(3.0), torch.tensor(2.0)
    out = pcme_loss(mu_i, lv_i, mu_t, lv_t, matched, a, b, 2, kl_weight=0.0,
                    generator=torch.Generator().manual_seed(9), balanced=False)
    g2 = torch.Generator().manual_seed(9)
    z_i, z_t = sample_embeddings(mu_i, lv_i, 2, g2), sample_embeddings(mu_t, lv_t, 2, g2)
    log_p, log_not_p = match_log_probs(z_i, z_t, a, b)
    nll = [-(log_p if m else log_not_p)[i, k] for i in range(3) for k in range(6)
           for m in [bool(matched[i, k])]]
    torch.testing.assert_close(out["loss"], torch.stack(nll).mean())


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_hard_negative_weighting_equals_plain_loop(beta):
    import math as m
    from encoders.training.losses import hard_negative_nll
    torch.manual_seed(3)
    matched = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    p = torch.rand(3, 5, dtype=torch.float64) * 0.9 + 0.05
    loglik = torch.where(matched, p.log(), (1 - p).log())
    pos = [-m.log(p[i, j]) for i in range(3) for j in range(5) if matched[i, j]]

    def side(pairs_of_anchor):
        per_anchor = []
        for pairs in pairs_of_anchor:
            negs = [(i, j) for i, j in pairs if not matched[i, j]]
            if not negs:
                continue
            w = [float(p[i, j]) ** beta for i, j in negs]
            per_anchor.append(sum(wk / sum(w) * -m.log(1 - p[i, j]) for wk, (i, j) in zip(w, negs)))
        return sum(per_anchor) / len(per_anchor)

    rows = side([[(i, j) for j in range(5)] for i in range(3)])
    cols = side([[(i, j) for i in range(3)] for j in range(5)])
    expected = sum(pos) / len(pos) + 0.5 * (rows + cols)
    assert float(hard_negative_nll(loglik, matched, beta)) == pytest.approx(expected, rel=1e-9)
