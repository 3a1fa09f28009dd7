"""Score functions against independent references: torch.distributions, general matrix
formulas, numerical integration, plain Python loops and Monte-Carlo estimates."""
import math

import numpy as np
import pytest
import torch

from core.errors import PcmeError
from core.pairwise import pairwise
from core.scores import SCORES, bhattacharyya, csd, elk, match_prob, mu_sim, rank_key, w2

GAUSS_SCORES = ["csd", "elk", "w2", "bhattacharyya"]


def _gauss(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*shape, generator=g, dtype=dtype)
    log_var = torch.randn(*shape, generator=g, dtype=dtype) - 1.0
    return mu, log_var


def _sqrtm_psd(m):
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


# ---------------------------------------------------------------------------- closed forms

def test_mu_sim_is_inner_product():
    mu_q, _ = _gauss(3, 5, seed=1)
    mu_d, _ = _gauss(3, 5, seed=2)
    expected = [sum(mu_q[i, k] * mu_d[i, k] for k in range(5)) for i in range(3)]
    torch.testing.assert_close(mu_sim(mu_q, mu_d), torch.stack(expected))


def test_elk_equals_normal_log_prob_of_difference():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(6, 4, seed=1), _gauss(6, 4, seed=2)
    cov = torch.diag_embed(lv_q.exp() + lv_d.exp())
    ref = torch.distributions.MultivariateNormal(mu_d, covariance_matrix=cov).log_prob(mu_q)
    torch.testing.assert_close(elk(mu_q, lv_q, mu_d, lv_d), ref)


def test_csd_matches_definition_and_monte_carlo():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(4, seed=3), _gauss(4, seed=4)
    got = csd(mu_q, lv_q, mu_d, lv_d)
    by_hand = sum((mu_q[k] - mu_d[k]) ** 2 + lv_q[k].exp() + lv_d[k].exp() for k in range(4))
    torch.testing.assert_close(got, by_hand)
    g = torch.Generator().manual_seed(5)
    n = 200_000
    z_q = mu_q + (0.5 * lv_q).exp() * torch.randn(n, 4, generator=g, dtype=torch.float64)
    z_d = mu_d + (0.5 * lv_d).exp() * torch.randn(n, 4, generator=g, dtype=torch.float64)
    sq = ((z_q - z_d) ** 2).sum(-1)
    assert abs(sq.mean() - got) < 4 * sq.std() / math.sqrt(n)


def test_w2_matches_general_gaussian_formula():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(5, seed=6), _gauss(5, seed=7)
    s1, s2 = torch.diag(lv_q.exp()), torch.diag(lv_d.exp())
    root2 = _sqrtm_psd(s2)
    cross = _sqrtm_psd(root2 @ s1 @ root2)
    ref = ((mu_q - mu_d) ** 2).sum() + torch.trace(s1 + s2 - 2 * cross)
    torch.testing.assert_close(w2(mu_q, lv_q, mu_d, lv_d), ref)


def test_bhattacharyya_matches_general_matrix_formula():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(5, seed=8), _gauss(5, seed=9)
    s1, s2 = torch.diag(lv_q.exp()), torch.diag(lv_d.exp())
    s = (s1 + s2) / 2
    diff = (mu_q - mu_d)[:, None]
    maha = (diff.T @ torch.linalg.solve(s, diff)).squeeze()
    ref = maha / 8 + 0.5 * (torch.logdet(s) - 0.5 * (torch.logdet(s1) + torch.logdet(s2)))
    torch.testing.assert_close(bhattacharyya(mu_q, lv_q, mu_d, lv_d), ref)
    assert bhattacharyya(mu_q, lv_q, mu_q, lv_q).abs() < 1e-12


def test_bhattacharyya_1d_matches_numerical_integral():
    mu_q, lv_q, mu_d, lv_d = (torch.tensor([v], dtype=torch.float64) for v in (0.3, -1.0, 1.1, 0.5))
    x = np.linspace(-15, 15, 200_001)

    def pdf(mu, lv):
        var = math.exp(lv)
        return np.exp(-(x - mu) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)

    coeff = np.trapezoid(np.sqrt(pdf(0.3, -1.0) * pdf(1.1, 0.5)), x)
    assert abs(bhattacharyya(mu_q, lv_q, mu_d, lv_d).item() + math.log(coeff)) < 1e-8


# ---------------------------------------------------------------------------- Monte Carlo

def _match_prob_loop(mu_q, lv_q, mu_d, lv_d, a, b, eps_q, eps_d):
    """Plain double loop over sample pairs for one query/item pair (1-d inputs)."""
    n = len(eps_q)
    total = 0.0
    for j in range(n):
        z_q = mu_q + torch.exp(0.5 * lv_q) * eps_q[j]
        for k in range(n):
            z_d = mu_d + torch.exp(0.5 * lv_d) * eps_d[k]
            dist = math.sqrt(sum((z_q[i] - z_d[i]).item() ** 2 for i in range(len(z_q))))
            total += 1.0 / (1.0 + math.exp(a * dist - b))
    return total / n**2


def test_match_prob_equals_double_loop_with_same_eps():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(2, 1, 4, seed=10), _gauss(1, 3, 4, seed=11)
    g = torch.Generator().manual_seed(12)
    eps_q = torch.randn(5, 2, 1, 4, generator=g, dtype=torch.float64)
    eps_d = torch.randn(5, 1, 3, 4, generator=g, dtype=torch.float64)
    got = match_prob(mu_q, lv_q, mu_d, lv_d, 2.0, 1.5, 5, eps_q=eps_q, eps_d=eps_d)
    assert got.shape == (2, 3)
    for i in range(2):
        for m in range(3):
            ref = _match_prob_loop(mu_q[i, 0], lv_q[i, 0], mu_d[0, m], lv_d[0, m], 2.0, 1.5,
                                   eps_q[:, i, 0], eps_d[:, 0, m])
            assert abs(got[i, m].item() - ref) < 1e-10


def test_match_prob_generator_is_reproducible_and_draws_query_first():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(4, seed=13), _gauss(6, 4, seed=14)
    first = match_prob(mu_q, lv_q, mu_d, lv_d, 3.0, 1.0, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    eps_q = torch.randn(4, 4, generator=g, dtype=torch.float64)
    eps_d = torch.randn(4, 6, 4, generator=g, dtype=torch.float64)
    again = match_prob(mu_q, lv_q, mu_d, lv_d, 3.0, 1.0, 4, eps_q=eps_q, eps_d=eps_d)
    torch.testing.assert_close(first, again)


@pytest.mark.slow
def test_match_prob_converges_to_independent_estimate():
    a, b = 2.0, 3.0
    mu_q, lv_q = np.array([0.2, -0.4, 0.1]), np.array([-1.0, -0.5, -2.0])
    mu_d, lv_d = np.array([0.5, 0.3, -0.2]), np.array([-1.5, -0.7, -1.0])
    rng = np.random.default_rng(0)
    n = 1_000_000  # independent (z_q, z_d) pairs
    z_q = mu_q + np.exp(0.5 * lv_q) * rng.standard_normal((n, 3))
    z_d = mu_d + np.exp(0.5 * lv_d) * rng.standard_normal((n, 3))
    probs = 1.0 / (1.0 + np.exp(a * np.linalg.norm(z_q - z_d, axis=1) - b))
    ref, ref_se = probs.mean(), probs.std() / math.sqrt(n)
    args = [torch.from_numpy(v) for v in (mu_q, lv_q, mu_d, lv_d)]
    rmse, estimates = [], None
    for n_samples in (2, 8, 32):
        estimates = np.array([match_prob(*args, a, b, n_samples,
                                         torch.Generator().manual_seed(s)).item()
                              for s in range(40)])
        rmse.append(np.sqrt(((estimates - ref) ** 2).mean()))
    assert rmse[0] > rmse[1] > rmse[2]
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - ref) < 4 * math.hypot(se, ref_se)


# ---------------------------------------------------------------------------- broadcasting

@pytest.mark.parametrize("name", GAUSS_SCORES)
def test_broadcasting_shapes_match_elementwise_calls(name):
    fn = SCORES[name][0]
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(4, seed=15), _gauss(3, 4, seed=16)
    one_vs_many = fn(mu_q, lv_q, mu_d, lv_d)
    assert one_vs_many.shape == (3,)
    for m in range(3):
        torch.testing.assert_close(one_vs_many[m], fn(mu_q, lv_q, mu_d[m], lv_d[m]))
    grid = fn(mu_d[:, None], lv_d[:, None], mu_d[None], lv_d[None])
    assert grid.shape == (3, 3)
    torch.testing.assert_close(grid[2, 1], fn(mu_d[2], lv_d[2], mu_d[1], lv_d[1]))


def test_mu_sim_broadcasts_like_matmul():
    mu_q, _ = _gauss(5, 1, 6, seed=17)
    mu_d, _ = _gauss(1, 4, 6, seed=18)
    torch.testing.assert_close(mu_sim(mu_q, mu_d), mu_q[:, 0] @ mu_d[0].T)


@pytest.mark.parametrize("name", list(SCORES))
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_pairwise_equals_direct_broadcast(name, chunk):
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(7, 6, seed=19), _gauss(5, 6, seed=20)
    fn = SCORES[name][0]
    if name == "mu":
        direct = fn(mu_q[:, None], mu_d[None])
        got = pairwise(name, mu_q, lv_q, mu_d, lv_d, chunk=chunk)
    elif name == "mc":
        g = torch.Generator().manual_seed(21)
        eps_q = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
        eps_d = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
        direct = fn(mu_q[:, None], lv_q[:, None], mu_d[None], lv_d[None], 2.0, 1.0, 3,
                    eps_q=eps_q[:, :, None], eps_d=eps_d[:, None])
        got = pairwise(name, mu_q, lv_q, mu_d, lv_d, chunk=chunk, a=2.0, b=1.0, n_samples=3,
                       eps_q=eps_q, eps_d=eps_d)
    else:
        direct = fn(mu_q[:, None], lv_q[:, None], mu_d[None], lv_d[None])
        got = pairwise(name, mu_q, lv_q, mu_d, lv_d, chunk=chunk)
    assert got.shape == (7, 5)
    torch.testing.assert_close(got, direct)


def test_pairwise_mc_with_generator_does_not_depend_on_chunking():
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(6, 4, seed=22), _gauss(5, 4, seed=23)
    runs = [pairwise("mc", mu_q, lv_q, mu_d, lv_d, chunk=c, a=3.0, b=2.0, n_samples=4,
                     generator=torch.Generator().manual_seed(0)) for c in (1, 4, None)]
    torch.testing.assert_close(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[2])


def test_rank_key_makes_higher_better():
    scores = torch.tensor([1.0, 3.0, 2.0])
    assert torch.equal(rank_key("elk", scores), scores)
    assert torch.equal(rank_key("csd", scores), -scores)
    assert rank_key("w2", scores).argmax() == 0
    # lower csd means more similar: the nearest item must get the highest rank key
    (mu_q, lv_q), (mu_d, lv_d) = _gauss(1, 3, seed=24), _gauss(4, 3, seed=25)
    mu_d[2] = mu_q[0]
    lv_d[:] = lv_q[0]
    assert rank_key("csd", pairwise("csd", mu_q, lv_q, mu_d, lv_d)).argmax() == 2


# ---------------------------------------------------------------------------- errors

def test_shape_errors_raise():
    mu, lv = _gauss(3, 4)
    with pytest.raises(PcmeError, match="log_var"):
        elk(mu, lv[:, :3], mu, lv)
    with pytest.raises(PcmeError, match="dim"):
        csd(mu, lv, mu[:, :3], lv[:, :3])
    with pytest.raises(PcmeError, match="broadcast"):
        w2(mu, lv, mu[:2], lv[:2])
    with pytest.raises(PcmeError, match="n_samples"):
        match_prob(mu, lv, mu, lv, 1.0, 0.0, 0)
    with pytest.raises(PcmeError, match="eps_q"):
        match_prob(mu, lv, mu, lv, 1.0, 0.0, 2, eps_q=torch.zeros(3, 3, 4))
    with pytest.raises(PcmeError, match="score cosine: unknown"):
        pairwise("cosine", mu, lv, mu, lv)
    with pytest.raises(PcmeError, match="pairwise"):
        pairwise("elk", mu[0], lv[0], mu, lv)
    with pytest.raises(PcmeError, match="no options"):
        pairwise("elk", mu, lv, mu, lv, n_samples=3)
