"""Compiled loops of the guaranteed search (numba): each reads a list block's μ once.

numpy needs four passes over a block's μ for a row bound (μ·a, μ⊙μ into a buffer, its product
with w, then ~15 element-wise passes over the per-row results), each a separate call with its
own temporaries; at 1M × 256 a query probes ~2,000 rows (2 MB), so those passes, not the
arithmetic, were the bound's 0.4–0.5 ms. Here one loop per row computes both dot products and
the whole bound, from μ's 16-bit codes (store format 6): the loop is memory-bound, and the
codes are half the bytes of float32 μ. Every function releases the GIL (nogil), so several
threads can run them on several cores (engine/batch.py does, for a batch of queries).

fastmath allows only reassociation (vectorised sums) and contraction (fused multiply-add):
either leaves a length-D dot product within the worst-case error the bound already takes off
((D + 16)·2⁻²³ of its absolute terms, for any summation order), and no flag here assumes away
NaN, infinity or exact division. Compiled code is cached beside this file (numba's cache; a
read-only install falls back to the user's cache directory), so only the first use in a fresh
install compiles: ~10 s. The guaranteed search over a batch, which reads its blocks through a
table of addresses, is in engine/table_kernels.py.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from indexer.variance import margin

FAST = {"reassoc", "contract"}
_margin = njit(nogil=True, cache=True)(margin)   # the rescoring margin, compiled from its source


@njit(nogil=True, cache=True, fastmath=FAST)
def row_bound_keys(codes, terms, ref, geo, mu_q, v_q, g_q, err, c, elk, key_const, out):
    """out[i] = the bound of engine/row_bounds.py for row i of one block, read from μ's 16-bit
    codes (indexer/blocks.py: mu_codes): codes int16 [n, D]; terms float32 [4, n] the rows' rho,
    lv_sum, scale and code_err (μ̂_i = scale_i·codes_i, ‖μ_i − μ̂_i‖ ≤ code_err_i); ref
    float32 [D + 1] the block's lv_ref and rho0; geo = exp(lv_sum / D) [n]; mu_q and v_q
    (float64 [D]) and the scalars the query's (QueryBounds). The block's weights w,
    A = Σ w μ_q² and t* come first (float64); the two dot products per row run in float32
    (codes are integers, exact in float32) against w rounded to float32, the per-row
    remainder in float64, which only rounds less than the float32 it is accounted for."""
    n, dim = codes.shape
    rho, lv_sum, scale, code_err = terms[0], terms[1], terms[2], terms[3]
    rho0 = float(ref[dim])
    w = np.empty(dim, np.float32)
    w_mu = np.empty(dim, np.float32)
    a = 0.0
    w_max = 0.0
    t_lo, t_hi = np.inf, -np.inf
    for d in range(dim):
        b = math.exp(float(ref[d]))
        wd = 1.0 / (v_q[d] + rho0 * b)
        w[d] = wd
        w_mu[d] = -2.0 * wd * mu_q[d]
        a += wd * mu_q[d] * mu_q[d]
        w_max = max(w_max, wd)
        t = v_q[d] / b
        t_lo, t_hi = min(t_lo, t), max(t_hi, t)
    sqrt_a = math.sqrt(a)
    sqrt_w_max = math.sqrt(w_max) * (1.0 + err)   # max_d w_d (float64), rounded up
    for i in range(n):
        s_mu = np.float32(0.0)
        s_sq = np.float32(0.0)
        for d in range(dim):
            m = np.float32(codes[i, d])
            s_mu += m * w_mu[d]
            s_sq += m * m * w[d]
        sc = float(scale[i])
        sq = float(s_sq) * sc * sc                      # C_i = (μ̂_i⊙μ̂_i)·w
        h = float(s_mu) * sc + sq + a                   # Σ w (μ̂_i − μ_q)²
        spread = math.sqrt(max(sq, 0.0)) + sqrt_a
        h = max(h - err * spread * spread, 0.0)           # |terms| ≤ (√A + √C_i)²
        q_err = float(code_err[i])
        if q_err > 0.0:   # ‖√w⊙(μ_i − μ_q)‖ ≥ ‖√w⊙(μ̂_i − μ_q)‖ − √max(w)·‖μ_i − μ̂_i‖
            root = max(math.sqrt(h) - sqrt_w_max * q_err, 0.0)
            h = root * root
        r = float(rho[i])
        if r >= rho0:
            h *= (t_lo + rho0) / (t_lo + r)
        else:
            h *= (t_hi + rho0) / (t_hi + r)
        h *= c * (1.0 - err)
        log_det = dim * math.log(geo[i] + g_q)
        log_det -= err * abs(log_det)
        kernel = h + log_det
        if elk:
            out[i] = key_const - 0.5 * kernel
        else:
            out[i] = key_const - 0.5 * kernel + 0.25 * float(lv_sum[i])


@njit(nogil=True, cache=True, fastmath=FAST)
def spread_key(mu_q, v_q, c, mu, lv_bits, lv_sum, half_exp, i, elk, key_const):
    """Exact elk or Bhattacharyya key of row i of one block, read in place: the kernel of
    core/scores.py (spread_kernel), Σ_d c·Δμ_d²/s_d + log s_d with s = v_q + v_i, v_i from the
    float16 log variance's bits through the exp table (half_exp), Σ log s as the log of a
    float64 product, taken early whenever it leaves [1e-100, 1e100] (4 more factors of s
    in float32's range, e^±103, cannot then leave float64's: e^±642), then elk_from_kernel
    or bhattacharyya_from_kernel (lv_sum: the rows' Σ log v; Σ lv_q and the constants are in
    key_const)."""
    dim = mu.shape[1]
    quad = 0.0
    log_s = 0.0
    prod = 1.0
    for d0 in range(0, dim, 4):
        for d in range(d0, min(d0 + 4, dim)):
            s = float(v_q[d]) + float(half_exp[lv_bits[i, d]])
            x = float(mu_q[d]) - float(mu[i, d])
            quad += x * x / s
            prod *= s
        if not 1e-100 < prod < 1e100:   # 4 more factors (each within e^±103) cannot overflow
            log_s += math.log(prod)
            prod = 1.0
    kernel = c * quad + log_s + math.log(prod)
    if elk:
        return key_const - 0.5 * kernel
    return key_const - 0.5 * kernel + 0.25 * float(lv_sum[i])


@njit(nogil=True, cache=True)
def spread_row_keys(mu_q, v_q, c, mu, lv_bits, lv_sum, half_exp, rows, first, elk, key_const,
                    out):
    """spread_key of the rows of one block among `rows` (positions in the concatenation of a
    query's blocks; this block holds positions first .. first + n − 1): out[j] for each such
    rows[j], the others untouched."""
    n = mu.shape[0]
    for j in range(len(rows)):
        i = rows[j] - first
        if 0 <= i < n:
            out[j] = spread_key(mu_q, v_q, c, mu, lv_bits, lv_sum, half_exp, i, elk, key_const)


@njit(nogil=True, cache=True, fastmath=FAST)
def distance_row_keys(w2, mu_q, v_q, mu, lv_bits, half_exp, rows, first, out):
    """Rank keys (minus the distance) of the rows of one block among `rows`, positioned as in
    spread_row_keys: csd = ‖Δμ‖² + Σ v_q + Σ v_i or, with w2, the squared 2-Wasserstein
    distance ‖Δμ‖² + Σ (σ_q − σ_i)² (core/scores.py: csd, w2), in float64, v_i through the
    float16 exp table."""
    n, dim = mu.shape
    sum_vq = 0.0
    for d in range(dim):
        sum_vq += float(v_q[d])
    for j in range(len(rows)):
        i = rows[j] - first
        if 0 <= i < n:
            dist = 0.0
            for d in range(dim):
                x = float(mu_q[d]) - float(mu[i, d])
                v = float(half_exp[lv_bits[i, d]])
                if w2:
                    y = math.sqrt(float(v_q[d])) - math.sqrt(v)
                    dist += x * x + y * y
                else:
                    dist += x * x + v
            out[j] = -dist if w2 else -(dist + sum_vq)


@njit(nogil=True, cache=True, fastmath=FAST)
def csd_keys(mu, sq_norm, var_sum, mu_q, const, out):
    """−csd of every row of one block from one pass over its μ (core/scores.py: csd):
    ‖μ_q − μ_i‖² + Σv_q + Σv_i = const + ‖μ_i‖² − 2 μ_q·μ_i + Σv_i with const = ‖μ_q‖² + Σv_q
    and the per-row ‖μ_i‖², Σv_i of the decoded block (float64); the inner product is
    accumulated in float64."""
    n, dim = mu.shape
    for i in range(n):
        ip = 0.0
        for d in range(dim):
            ip += float(mu[i, d]) * mu_q[d]
        out[i] = -(const + sq_norm[i] - 2.0 * ip + var_sum[i])


@njit(nogil=True, cache=True)
def copy_rows(ids, mu, lv_bits, rows, first, out_ids, out_mu, out_lv):
    """Copy the rows of one block among `rows` (positions in a concatenation of blocks, this
    block holding first .. first + n − 1) to out_*[j] for each such rows[j]: id, μ, and the
    log variance's float16 bits."""
    n = len(ids)
    for j in range(len(rows)):
        i = rows[j] - first
        if 0 <= i < n:
            out_ids[j] = ids[i]
            out_mu[j, :] = mu[i]
            out_lv[j, :] = lv_bits[i]


@njit(nogil=True, cache=True)
def top_columns(keys, n, out):
    """out[q] = the columns of the n largest keys[q] (float32 [Q, C]), largest first, the
    lower column first among equal keys: each query's nearest inverted lists from its keys
    for every centroid."""
    for q in range(keys.shape[0]):
        row = keys[q]
        m = 0
        for c in range(row.shape[0]):
            if m < n or row[c] > row[out[q, n - 1]]:
                j = min(m, n - 1)
                while j > 0 and row[c] > row[out[q, j - 1]]:   # insertion: n is small
                    out[q, j] = out[q, j - 1]
                    j -= 1
                out[q, j] = c
                m += 1


@njit(nogil=True, cache=True)
def half_values(bits, half_value, out):
    """out = the float32 values of float16 bits [n, D] through the table of every float16
    value (engine/rescore.py: half_value_table): numpy's own float16 conversion took 1.6 ms
    for 2,000 × 256 values, this loop a few hundredths of that."""
    flat_bits, flat_out = bits.reshape(-1), out.reshape(-1)
    for i in range(flat_bits.shape[0]):
        flat_out[i] = half_value[flat_bits[i]]
