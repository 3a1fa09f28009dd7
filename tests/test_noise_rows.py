"""The fixed serving noise (core/montecarlo.py) is drawn row by row on first use: a row's
values do not depend on which rows were drawn before it, and they are standard normal."""
import numpy as np

from core import montecarlo as mc


def test_rows_do_not_depend_on_draw_order():
    mc._noise_table.cache_clear()
    late = mc._noise_rows(np.asarray([7, 4095, 4096]), 4, 6).numpy().copy()
    mc._noise_table.cache_clear()
    mc._noise_rows(np.arange(0, 4097, 3), 4, 6)           # other rows first
    again = mc._noise_rows(np.asarray([7, 4095, 4096]), 4, 6).numpy()
    np.testing.assert_array_equal(late, again)
    eps_q, eps_d = mc.item_noise(np.asarray([[7, 7 + mc.NOISE_ROWS]]), 4, 6)
    np.testing.assert_array_equal(eps_d[:, 0, 0], late[0])  # ids agreeing mod NOISE_ROWS share
    np.testing.assert_array_equal(eps_d[:, 0, 1], late[0])
    np.testing.assert_array_equal(eps_q[:, 0, 0], late[2])  # the query row


def test_rows_are_standard_normal():
    mc._noise_table.cache_clear()
    x = mc._noise_rows(np.arange(mc.NOISE_ROWS), 2, 8).numpy().ravel()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01   # 65k draws: std errors 0.004, 0.003
    rows = mc._noise_rows(np.arange(mc.NOISE_ROWS), 2, 8).numpy().reshape(mc.NOISE_ROWS, -1)
    assert np.abs(np.corrcoef(rows[:200])[np.triu_indices(200, 1)]).max() < 0.9  # distinct streams
