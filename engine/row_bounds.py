"""Per-row bounds: the best elk or Bhattacharyya key each row of a list block could have, from
one matrix-vector product over the block and three numbers per row (store format 4), so the
exact kernel runs only on the rows that could still enter the top k.

Both scores rest on the kernel of core/scores.py (spread_kernel), with v = exp(log_var):

  K_i = c·Σ_d Δμ_d²/(v_q,d + v_i,d) + Σ_d log(v_q,d + v_i,d)      elk c = 1, bhattacharyya c = ½
  elk key = −½(K_i + D log 2π);  bhattacharyya = ½K_i − ½D log 2 − ¼(Σlv_q + Σlv_i) (lower better)

so a lower bound on K_i bounds the key from above. The build stores per block the
per-dimension mean r_d of the rows' stored log v (b_d = e^{r_d}), and per row (indexer/lists.py:
row_scalars) ρ_i = exp(max_d(lv_i,d − r_d)), so that v_i,d ≤ ρ_i·b_d;
L_i = Σ_d lv_i,d; and S_i = Σ_d μ_i,d²/b_d.

Δμ part. With t_d = v_q,d/b_d (the query's variance in the block's units) and x_d = Δμ_d²/b_d,
  Σ_d Δμ_d²/(v_q,d + v_i,d) ≥ Σ_d x_d/(t_d + ρ_i) ≥ X_i/(max_d t_d + ρ_i),
  X_i = Σ_d x_d = Σ_d μ_q,d²/b_d + S_i − 2·⟨μ_q/b, μ_i⟩,
one matrix-vector product for the whole block. It gives up the spread of t_d (the query's
variance shape against the block's) and of lv_i,d − r_d (the row's against the block's): on
the synthetic 1M × 256 set a few per cent of the Δμ part.

log part. Σ_d log(v_q,d + v_i,d) ≥ D·log(G_q + G_i), G = exp(L/D) the geometric mean of a
variance vector (the geometric mean is superadditive: Minkowski's inequality), with equality
when v_i is proportional to v_q.

Rounding: everything per row runs in float32, so X_i is lowered by (D + 16)·2⁻²³·(√a + √S_i)²
(a = Σ μ_q²/b; the worst-case error of a length-D dot product, whose absolute terms Cauchy–Schwarz
bounds by that square, plus a few roundings), and the other terms by the same relative amount;
S_i and ρ_i were rounded the safe way at build time. The engine compares with the REL_TOL margin
of the other bounds (indexer/variance.py: margin).
"""
from __future__ import annotations

import math

import numpy as np

from core.constants import LOG_2PI

SCORES = ("elk", "bhattacharyya")   # the scores with the spread kernel; csd/w2 bounds are tight


class QueryBounds:
    """One query's terms, computed once and applied to each of its probed blocks."""

    def __init__(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray):
        if score not in SCORES:
            raise ValueError(f"row bounds: {score} has no spread kernel")
        self.score, self.c = score, 1.0 if score == "elk" else 0.5
        self.mu_q = mu_q.astype(np.float64)
        self.lv_q = lv_q.astype(np.float64)
        self.dim = len(mu_q)
        self.lsum_q = float(self.lv_q.sum())
        self.g_q = math.exp(self.lsum_q / self.dim)        # geometric mean of v_q
        # float32 evaluation: the dot product's worst case plus a few roundings per row
        self.err = (self.dim + 16) * 2.0 ** -23

    def block(self, block) -> np.ndarray:
        """[n] upper bounds on the rank key (higher is better) of the rows of a format-4 block,
        float32 arithmetic with its rounding taken off the bound."""
        if not len(block.ids):
            return np.zeros(0, np.float32)
        ref = block.lv_ref.astype(np.float64)
        q_white = self.mu_q * np.exp(-ref)                 # μ_q/b
        a = float(q_white @ self.mu_q)                     # Σ μ_q²/b
        t_max = math.exp(float((self.lv_q - ref).max()))   # max_d v_q,d/b_d
        s = block.mu_white
        x = block.mu @ (-2.0 * q_white).astype(np.float32)    # −2⟨μ_q/b, μ_i⟩
        x += s
        x += np.float32(a)
        root = np.sqrt(s)
        root += np.float32(math.sqrt(a))
        x -= np.float32(self.err) * root * root            # |terms| ≤ (√a + √S_i)²
        np.maximum(x, 0.0, out=x)
        x /= block.rho + np.float32(t_max)
        x *= np.float32(self.c * (1.0 - self.err))         # the division's rounding, too
        log_det = np.exp(block.lv_sum * np.float32(1.0 / self.dim))
        log_det += np.float32(self.g_q)
        np.log(log_det, out=log_det)
        log_det *= np.float32(self.dim)
        log_det -= np.float32(self.err) * np.abs(log_det)
        kernel = x + log_det
        if self.score == "elk":
            return np.float32(-0.5) * kernel - np.float32(0.5 * self.dim * LOG_2PI)
        return np.float32(0.5 * self.dim * math.log(2.0) + 0.25 * self.lsum_q) \
            - np.float32(0.5) * kernel + np.float32(0.25) * block.lv_sum
