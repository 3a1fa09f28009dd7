"""The compiled inner loop of the served match probability (core/served_mc.py:
fixed_match_prob): squared distances between the query's samples and each item's samples,
with the item's samples made on the fly from its noise row, one item at a time.

Written with torch ops, the same sums made the items' samples as a [M·J, D] tensor first
(gather the noise rows, scale, add μ, take norms, then one matrix product): four passes over
3.2 MB for 200 items × 16 samples × 256 dims, which cost more than the product itself (2–3 ms
for 200 items on one core against ~0.35 ms for the product alone). Here one item's J samples
(J × D, a few KB) are made in cache and multiplied with the query's samples while there;
the loop blocks two item samples × four query samples per pass over D, so each value loaded
feeds several multiply-adds (0.9 ms for those 200 items). fixed_match_prob calls it for one
query against a shortlist of at least LOOP_MIN_ITEMS items.

fastmath allows reassociation (vectorised sums) and contraction (fused multiply-add) only:
the distances differ from a fixed-order sum in the last bits (relative 1e-6 in float32,
1e-15 in float64; tests/test_noise_rows.py compares with a float64 numpy sum). Accumulators
take the output's dtype, so float64 callers (tests, references) get float64 sums. numba's
cache keeps the compiled code beside this file (one compile per dtype, a few seconds).
"""
from __future__ import annotations

import numpy as np
from numba import njit

FAST = {"reassoc", "contract"}


@njit(nogil=True, cache=True, fastmath=FAST)
def sample_sq_dists(z_q, mu_d, scale_d, rows, table, out):
    """out[i, k, j] = ‖z_d^k(i)‖² − 2⟨z_q[j], z_d^k(i)⟩ for item i's sample
    z_d^k(i) = mu_d[i] + scale_d[i] ⊙ table[rows[i], k]; the caller adds ‖z_q[j]‖².

    z_q [P, D] (every query's samples), mu_d and scale_d [M, D], rows [M] the items' noise
    rows, table [R, J, D] the noise, out [M, J, P]. The blocks of 2 and 4 clamp their last
    index, so an odd J or P computes (and writes) its last sample twice, identically."""
    n_zq, dim = z_q.shape
    n_samples = table.shape[1]
    zero = np.zeros(1, out.dtype)[0]
    z = np.empty((2, dim), out.dtype)
    for i in range(mu_d.shape[0]):
        eps = table[rows[i]]
        for k in range(0, n_samples, 2):
            k2 = min(k + 1, n_samples - 1)
            sa, sb = zero, zero
            for d in range(dim):
                va = mu_d[i, d] + scale_d[i, d] * eps[k, d]
                vb = mu_d[i, d] + scale_d[i, d] * eps[k2, d]
                z[0, d], z[1, d] = va, vb
                sa += va * va
                sb += vb * vb
            for j in range(0, n_zq, 4):
                j1, j2, j3 = min(j + 1, n_zq - 1), min(j + 2, n_zq - 1), min(j + 3, n_zq - 1)
                a0, a1, a2, a3, b0, b1, b2, b3 = zero, zero, zero, zero, zero, zero, zero, zero
                for d in range(dim):
                    za, zb = z[0, d], z[1, d]
                    q0, q1, q2, q3 = z_q[j, d], z_q[j1, d], z_q[j2, d], z_q[j3, d]
                    a0 += q0 * za
                    a1 += q1 * za
                    a2 += q2 * za
                    a3 += q3 * za
                    b0 += q0 * zb
                    b1 += q1 * zb
                    b2 += q2 * zb
                    b3 += q3 * zb
                out[i, k, j3], out[i, k2, j3] = sa - (a3 + a3), sb - (b3 + b3)
                out[i, k, j2], out[i, k2, j2] = sa - (a2 + a2), sb - (b2 + b2)
                out[i, k, j1], out[i, k2, j1] = sa - (a1 + a1), sb - (b1 + b1)
                out[i, k, j], out[i, k2, j] = sa - (a0 + a0), sb - (b0 + b0)
