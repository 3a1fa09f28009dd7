"""The fixed serving noise (core/served_mc.py) is drawn row by row on first use: a row's
values do not depend on which rows were drawn before it, and they are standard normal."""
import numpy as np
import pytest

from core import served_mc as mc


def test_rows_do_not_depend_on_draw_order():
    mc._noise_table.cache_clear()
    late = mc.noise_rows(np.asarray([7, 4095, 4096]), 4, 6).copy()
    mc._noise_table.cache_clear()
    mc.noise_rows(np.arange(0, 4097, 3), 4, 6)           # other rows first
    again = mc.noise_rows(np.asarray([7, 4095, 4096]), 4, 6)
    np.testing.assert_array_equal(late, again)
    eps_q, eps_d = mc.item_noise(np.asarray([[7, 7 + mc.NOISE_ROWS]]), 4, 6)
    np.testing.assert_array_equal(eps_d[:, 0, 0], late[0])  # ids agreeing mod NOISE_ROWS share
    np.testing.assert_array_equal(eps_d[:, 0, 1], late[0])
    np.testing.assert_array_equal(eps_q[:, 0, 0], late[2])  # the query row


def test_rows_are_standard_normal():
    mc._noise_table.cache_clear()
    x = mc.noise_rows(np.arange(mc.NOISE_ROWS), 2, 8).ravel()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01   # 65k draws: std errors 0.004, 0.003
    rows = mc.noise_rows(np.arange(mc.NOISE_ROWS), 2, 8).reshape(mc.NOISE_ROWS, -1)
    assert np.abs(np.corrcoef(rows[:200])[np.triu_indices(200, 1)]).max() < 0.9  # distinct streams


@pytest.mark.parametrize("path", ["loop", "product", "product on threads"])
def test_fixed_match_prob_is_the_pair_average_over_the_item_rows(monkeypatch, path):
    """fixed_match_prob in blocks (three items per block here, the last one short), by the
    compiled loop and by the matrix product (its four blocks one after the other or on the
    thread pool), against a float64 numpy sum over every sample pair, each side sampled from
    its own noise row."""
    monkeypatch.setattr(mc, "LOOP_MAX_QUERY_SAMPLES", 10**9 if path == "loop" else 0)
    monkeypatch.setattr(mc, "PARALLEL_MIN_BLOCKS", 1 if path == "product on threads" else 10**9)
    monkeypatch.setattr(mc, "LOOP_MIN_ITEMS", 1)
    monkeypatch.setattr(mc, "FIXED_BLOCK_FLOATS", 3 * 4 * (2 * 4))  # J · Q·J per item: 3 items
    rng = np.random.default_rng(3)
    mu_q, mu_d = rng.normal(size=(2, 6)) * 0.4, rng.normal(size=(10, 6)) * 0.4
    lv_q, lv_d = rng.normal(-2.0, 0.5, (2, 6)), rng.normal(-2.0, 0.5, (10, 6))
    ids = rng.integers(0, 3 * mc.NOISE_ROWS, 10)
    a, b = 3.0, 1.5
    got = mc.fixed_match_prob(mu_q, lv_q, mu_d, lv_d, ids, a, b, n_samples=4)
    eps_q = mc.noise_rows(np.asarray([mc.NOISE_ROWS]), 4, 6)[0].astype(np.float64)
    eps_d = mc.noise_rows(ids % mc.NOISE_ROWS, 4, 6).astype(np.float64)
    z_q = mu_q[:, None] + np.exp(lv_q / 2)[:, None] * eps_q             # [Q, J, D]
    z_d = mu_d[:, None] + np.exp(lv_d / 2)[:, None] * eps_d             # [M, J, D]
    dist = np.linalg.norm(z_q[:, :, None, None] - z_d[None, None], axis=-1)   # [Q, J, M, J]
    ref = (1 / (1 + np.exp(a * dist - b))).mean(axis=(1, 3))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert ref.std() > 0.01                                  # the pairs differ: a real check
