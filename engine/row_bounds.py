"""Per-row bounds: the best elk or Bhattacharyya key each row of a list block could have, from
two matrix-vector products over the block and two numbers per row (store format 4), so the
exact kernel runs only on the rows that could still enter the top k.

Both scores rest on the kernel of core/scores.py (spread_kernel), with v = exp(log_var):

  K_i = c·Σ_d Δμ_d²/(v_q,d + v_i,d) + Σ_d log(v_q,d + v_i,d)      elk c = 1, bhattacharyya c = ½
  elk key = −½(K_i + D log 2π);  bhattacharyya = ½K_i − ½D log 2 − ¼(Σlv_q + Σlv_i) (lower better)

so a lower bound on K_i bounds the key from above. The build stores per block the
per-dimension mean r_d of the rows' stored log v (b_d = e^{r_d}), and per row (indexer/lists.py:
row_scalars) ρ_i = exp(max_d(lv_i,d − r_d)), so that v_i,d ≤ ρ_i·b_d, and L_i = Σ_d lv_i,d.

Δμ part. Σ_d Δμ_d²/(v_q,d + v_i,d) ≥ Σ_d Δμ_d²/(v_q,d + ρ_i·b_d). At the block's median ρ0,
  h_i = Σ_d w_d Δμ_d² = Σ w μ_q² − 2 μ_i·(w⊙μ_q) + (μ_i⊙μ_i)·w,   w_d = 1/(v_q,d + ρ0·b_d),
is two matrix-vector products for the whole block (one over μ, one over μ⊙μ). With
t_d = v_q,d/b_d, term d changes by the factor (t_d + ρ0)/(t_d + ρ_i) when ρ0 becomes ρ_i; for
ρ_i ≥ ρ0 that factor is smallest at the smallest t_d, for ρ_i < ρ0 at the largest, so
  Σ_d Δμ_d²/(v_q,d + ρ_i·b_d) ≥ h_i·(t* + ρ0)/(t* + ρ_i),  t* = min_d t_d or max_d t_d.
It keeps the query's own variance shape and gives up only the spread of a row's lv_i,d − r_d.

log part. Σ_d log(v_q,d + v_i,d) ≥ D·log(G_q + G_i), G = exp(L/D) the geometric mean of a
variance vector (the geometric mean is superadditive: Minkowski's inequality), with equality
when v_i is proportional to v_q.

Measured (shortlist p50, top-10, against 775 / 1,118 with the one global bound per query): the
synthetic 1M × 256 set 54 rows; the scenes model's 10k training images (128-d, trained σ) 207;
the bound with the exact Δμ part would need ~11 on both, so the row's variance spread is what
is left.

Rounding: everything per row runs in float32, so h_i is lowered by (D + 16)·2⁻²³·(√A + √C_i)²
(A = Σ w μ_q², C_i = (μ_i⊙μ_i)·w: the worst-case error of a length-D dot product, whose absolute
terms that square bounds, plus a few roundings), and the other terms by the same relative
amount; ρ_i was rounded up at build time. The engine compares with the REL_TOL margin of the
other bounds (indexer/variance.py: margin).
"""
from __future__ import annotations

import math
import threading

import numpy as np

from core.constants import LOG_2PI

SCORES = ("elk", "bhattacharyya")   # the scores with the spread kernel; csd/w2 bounds are tight
_scratch = threading.local()         # μ⊙μ buffer per thread: fresh pages cost more than the math


def squares(mu: np.ndarray) -> np.ndarray:
    """μ⊙μ of a block, in this thread's reused buffer (valid until its next call)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[0] < len(mu) or buf.shape[1] != mu.shape[1]:
        buf = _scratch.buf = np.empty((max(len(mu), 2048), mu.shape[1]), np.float32)
    return np.multiply(mu, mu, out=buf[:len(mu)])


class QueryBounds:
    """One query's terms, computed once and applied to each of its probed blocks."""

    def __init__(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray):
        if score not in SCORES:
            raise ValueError(f"row bounds: {score} has no spread kernel")
        self.score, self.c = score, 1.0 if score == "elk" else 0.5
        self.mu_q = mu_q.astype(np.float64)
        self.lv_q = lv_q.astype(np.float64)
        self.v_q = np.exp(self.lv_q)
        self.dim = len(mu_q)
        self.lsum_q = float(self.lv_q.sum())
        self.g_q = math.exp(self.lsum_q / self.dim)        # geometric mean of v_q
        # float32 evaluation: the dot product's worst case plus a few roundings per row
        self.err = (self.dim + 16) * 2.0 ** -23

    def blocks(self, parts: list) -> np.ndarray:
        """[Σ n] upper bounds on the rank key (higher is better) of the rows of format-4 blocks,
        in the order of their concatenation; float32 arithmetic with its rounding taken off
        the bound. The per-block terms are computed for all blocks at once, so many small
        blocks (a small index probing many lists) cost two products each and little else."""
        live = [p for p in parts if len(p.ids)]
        if not live:
            return np.zeros(0, np.float32)
        sizes = np.array([len(p.ids) for p in live])
        b = np.exp(np.stack([p.lv_ref for p in live]).astype(np.float64))     # [B, D]
        rho0 = np.array([p.rho0 for p in live])
        w = 1.0 / (self.v_q + rho0[:, None] * b)
        a = w @ self.mu_q ** 2                                # [B] Σ w μ_q²
        t = self.v_q / b
        h = np.empty(sizes.sum(), np.float32)
        c = np.empty(sizes.sum(), np.float32)
        w_mu, w32 = (-2.0 * w * self.mu_q).astype(np.float32), w.astype(np.float32)
        for j, (p, end) in enumerate(zip(live, np.cumsum(sizes))):
            at = slice(end - sizes[j], end)
            np.matmul(p.mu, w_mu[j], out=h[at])                # −2 μ_i·(w⊙μ_q)
            np.matmul(squares(p.mu), w32[j], out=c[at])        # (μ_i⊙μ_i)·w
        rho = np.concatenate([p.rho for p in live])
        lv_sum = np.concatenate([p.lv_sum for p in live])
        a, rho0 = np.repeat(a.astype(np.float32), sizes), np.repeat(rho0.astype(np.float32), sizes)
        t_lo = np.repeat(t.min(axis=1).astype(np.float32), sizes)
        t_hi = np.repeat(t.max(axis=1).astype(np.float32), sizes)
        h += c
        h += a
        np.sqrt(c, out=c)
        c += np.sqrt(a)
        h -= np.float32(self.err) * c * c                    # |terms| ≤ (√A + √C_i)²
        np.maximum(h, 0.0, out=h)
        h *= np.where(rho >= rho0, (t_lo + rho0) / (t_lo + rho), (t_hi + rho0) / (t_hi + rho))
        h *= np.float32(self.c * (1.0 - self.err))           # the factor's rounding, too
        log_det = np.exp(lv_sum * np.float32(1.0 / self.dim))
        log_det += np.float32(self.g_q)
        np.log(log_det, out=log_det)
        log_det *= np.float32(self.dim)
        log_det -= np.float32(self.err) * np.abs(log_det)
        kernel = h + log_det
        if self.score == "elk":
            return np.float32(-0.5) * kernel - np.float32(0.5 * self.dim * LOG_2PI)
        return np.float32(0.5 * self.dim * math.log(2.0) + 0.25 * self.lsum_q) \
            - np.float32(0.5) * kernel + np.float32(0.25) * lv_sum
