"""The per-dimension caps of the shortlist bound (indexer/variance.py): the greedy knapsack
equals a brute force over the LP's vertices, its inverse inverts it, the capped bound is never
beaten by a stored item and never looser than the line it replaces, and a manifest without the
μ range gives exactly the old line."""
import itertools

import numpy as np
import pytest

from indexer.variance import Knapsack, VarianceBounds, VarianceStats, required_ip, unseen_best
from tests.test_engine_search import brute

RNG = np.random.default_rng(7)


def vertex_min(w: np.ndarray, c: np.ndarray, delta: float) -> float:
    """min Σ w·x, Σ x ≥ δ, 0 ≤ x ≤ c: an optimum is a vertex (every x_d at 0 or c_d but at
    most one), so try them all."""
    best = np.inf if delta > c.sum() else 0.0 if delta <= 0 else np.inf
    d = len(w)
    for full in itertools.product((0, 1), repeat=d):
        full = np.asarray(full, bool)
        base_mass, base_cost = c[full].sum(), (w * c)[full].sum()
        if base_mass >= delta:
            best = min(best, base_cost)
        for j in np.flatnonzero(~full):   # one fractional dimension takes the rest
            rest = delta - base_mass
            if 0 < rest <= c[j]:
                best = min(best, base_cost + w[j] * rest)
    return best


@pytest.mark.parametrize("trial", range(4))
def test_knapsack_equals_vertex_brute_force(trial):
    w = RNG.uniform(0.1, 3.0, (2, 6))
    c = RNG.uniform(0.0, 0.5, 6)
    f = Knapsack(w, c)
    for delta in np.linspace(0, c.sum() * 1.1, 23):
        if abs(delta - c.sum()) < 1e-9:   # Σ c summed in another order: either side of δ
            continue
        got = f.value(delta)
        want = [vertex_min(w[s], c, delta) for s in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        finite = np.isfinite(got)
        if finite.all() and delta > 0:   # the inverse gives back δ on the rising part
            np.testing.assert_allclose(f.inverse(got), delta, rtol=1e-9)


def test_no_caps_give_the_old_line():
    w = RNG.uniform(0.1, 3.0, (3, 5))
    f = Knapsack(w, None)
    np.testing.assert_allclose(f.value(0.7), 0.7 * w.min(axis=1))
    np.testing.assert_allclose(f.inverse(np.asarray([0.2, -1.0, 5.0])),
                               [0.2 / w[0].min(), 0.0, 5.0 / w[2].min()])


def _stats(mu, lv, edges=(-20.0,)):
    s = VarianceStats(mu.shape[1], edges)
    s.update(mu, lv)
    return s.to_json()


def _data(n, d, spread, lv_mean=-4.0):
    mu = RNG.standard_normal((n, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    profile = RNG.uniform(-1.5, 1.5, d)   # dimensions differ in variance: α alone is loose
    lv = (lv_mean + profile + spread * RNG.standard_normal((n, d))).astype(np.float32)
    return mu, lv


# (-1.5, 0.02): queries far more uncertain than items, as a trained text head's are, and items
# alike in σ, so the log-det part of the bound is nearly attained (the Bhattacharyya one once
# counted it twice)
@pytest.mark.parametrize("query_lv,item_spread", ((-4.0, 0.6), (-1.5, 0.02)))
@pytest.mark.parametrize("score", ("elk", "bhattacharyya", "csd", "w2"))
def test_capped_bound_is_never_beaten_and_no_looser(score, query_lv, item_spread):
    mu, lv = _data(4000, 8, item_spread)
    capped = VarianceBounds.from_json(_stats(mu, lv))
    line = VarianceBounds.from_json({k: v for k, v in _stats(mu, lv).items()
                                     if k not in ("mu_min", "mu_max")})
    assert line.mu_min is None and capped.mu_min is not None
    q_mu, q_lv = _data(6, 8, 0.3, query_lv)
    tighter = 0
    for i in range(len(q_mu)):
        ip, keys = mu @ q_mu[i], brute(score, q_mu[i], q_lv[i], mu, lv)
        for t in np.quantile(ip, [0.3, 0.7, 0.95, 0.99]):
            a = unseen_best(score, float(t), q_mu[i], q_lv[i], capped)
            b = unseen_best(score, float(t), q_mu[i], q_lv[i], line)
            assert keys[ip <= t].max() <= a + 1e-6
            assert a <= b + 1e-9
            tighter += a < b - 1e-9
        kth = float(np.sort(keys)[-10])
        t_c = required_ip(score, kth, q_mu[i], q_lv[i], capped)
        t_l = required_ip(score, kth, q_mu[i], q_lv[i], line)
        assert t_c >= t_l - 1e-9                              # never a longer shortlist
        assert (keys[ip <= t_c] < kth).all()                  # and still every winner above t
    if score in ("elk", "bhattacharyya"):   # the weights differ per dimension: caps bite
        assert tighter > 0
