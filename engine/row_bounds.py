"""Per-row bounds: the best elk or Bhattacharyya key each row of a list block could have, from
two dot products per row and two numbers per row (store format 4), so the
exact kernel runs only on the rows that could still enter the top k.

Both scores rest on the kernel of core/scores.py (spread_kernel), with v = exp(log_var):

  K_i = c·Σ_d Δμ_d²/(v_q,d + v_i,d) + Σ_d log(v_q,d + v_i,d)      elk c = 1, bhattacharyya c = ½
  elk key = −½(K_i + D log 2π);  bhattacharyya = ½K_i − ½D log 2 − ¼(Σlv_q + Σlv_i) (lower better)

so a lower bound on K_i bounds the key from above. The build stores per block the
per-dimension mean r_d of the rows' stored log v (b_d = e^{r_d}), and per row (indexer/blocks.py:
row_scalars) ρ_i = exp(max_d(lv_i,d − r_d)), so that v_i,d ≤ ρ_i·b_d, and L_i = Σ_d lv_i,d.

Δμ part. Σ_d Δμ_d²/(v_q,d + v_i,d) ≥ Σ_d Δμ_d²/(v_q,d + ρ_i·b_d). At the block's median ρ0,
  h_i = Σ_d w_d Δμ_d² = Σ w μ_q² − 2 μ_i·(w⊙μ_q) + (μ_i⊙μ_i)·w,   w_d = 1/(v_q,d + ρ0·b_d),
is two dot products per row (μ_i·(w⊙μ_q), (μ_i⊙μ_i)·w), one pass over the block. With
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

Codes. The two dot products read μ's 16-bit codes (store format 6, indexer/blocks.py:
mu_codes), μ̂_i = s_i·codes_i with ‖μ_i − μ̂_i‖ ≤ e_i stored per row (~2⁻¹⁵·‖μ_i‖). By the
triangle inequality in the w-weighted norm,
  √h_i = ‖√w⊙(μ_i − μ_q)‖ ≥ ‖√w⊙(μ̂_i − μ_q)‖ − √max_d w_d · e_i,
so the bound computes ĥ_i from the codes and takes (max(√ĥ_i − √w_max·e_i, 0))². It moves the
shortlist by nothing measurable (p50 51 rows at 1M either way) and halves the pass's bytes.

Rounding: the two dot products run in float32 (the rest of a row in float64), so ĥ_i is
lowered by (D + 16)·2⁻²³·(√A + √C_i)² (A = Σ w μ_q², C_i = (μ̂_i⊙μ̂_i)·w: the worst-case error
of a length-D dot product, whose absolute terms that square bounds, plus a few roundings), and
the other terms by the same relative amount; ρ_i and e_i were rounded up at build time. The
engine compares with the REL_TOL margin of the other bounds (indexer/variance.py: margin).
"""
from __future__ import annotations

import math

import numpy as np

from engine import kernels
from engine.rescore import half_exp_table, spread_terms

SCORES = ("elk", "bhattacharyya")   # the scores with the spread kernel; csd/w2 bounds are tight


class QueryBounds:
    """One query's terms, computed once and applied to each of its probed blocks."""

    def __init__(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray):
        if score not in SCORES:
            raise ValueError(f"row bounds: {score} has no spread kernel")
        self.score = score
        self.c, self.key_const = spread_terms(score, lv_q)
        self.mu_q = mu_q.astype(np.float64)
        self.lv_q = lv_q.astype(np.float64)
        self.v_q = np.exp(self.lv_q)
        self.dim = len(mu_q)
        self.lsum_q = float(self.lv_q.sum())
        self.g_q = math.exp(self.lsum_q / self.dim)        # geometric mean of v_q
        # float32 evaluation: the dot product's worst case plus a few roundings per row
        self.err = (self.dim + 16) * 2.0 ** -23
        self.elk = score == "elk"

    def blocks(self, parts: list) -> np.ndarray:
        """[Σ n] upper bounds on the rank key (higher is better) of the rows of format-4 blocks,
        in the order of their concatenation: one compiled pass per block (engine/kernels.py)."""
        out = np.empty(sum(len(p.ids) for p in parts), np.float32)
        end = 0
        for p in parts:
            if len(p.ids):
                at, end = end, end + len(p.ids)
                kernels.row_bound_keys(p.codes, p.terms, p.ref, p.geo, self.mu_q, self.v_q,
                                       self.g_q, self.err, self.c, self.elk, self.key_const,
                                       out[at:end])
        return out

    def topk(self, parts: list, first: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(positions in the concatenation of `parts`, keys) of the exact top k, best first, and
        the number of rows scored exactly: the guaranteed search of one query over its probed
        format-4 blocks, in one compiled call (engine/kernels.py: guaranteed_topk). Empty
        blocks hold no positions, so leaving them out changes none."""
        live = [p for p in parts if len(p.ids)]
        if sum(len(p.ids) for p in live) < k:   # the probe widens until it cannot happen
            raise ValueError(f"row bounds: fewer than k = {k} rows in the probed lists")
        rows, keys = np.empty(k, np.int64), np.empty(k, np.float32)
        m = kernels.guaranteed_topk(
            tuple(p.codes for p in live), tuple(p.terms for p in live),
            tuple(p.ref for p in live), tuple(p.geo for p in live), tuple(p.mu for p in live),
            tuple(p.lv_bits for p in live), self.mu_q, self.v_q, self.g_q, self.err, self.c,
            self.elk, self.key_const, half_exp_table(), first, k, rows, keys)
        return rows, keys, int(m)
