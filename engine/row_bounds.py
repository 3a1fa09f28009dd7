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

import numpy as np

from engine import kernels, table_kernels
from engine.block_table import BlockTable
from engine.rescore import half_exp_table, spread_terms

SCORES = ("elk", "bhattacharyya")   # the scores with the spread kernel; csd/w2 bounds are tight


class QueryTerms:
    """The terms of Q queries ([Q, D] μ and log variance) that the compiled bound and exact key
    read, computed once per query: μ_q and v_q in float64, the geometric mean g_q of v_q, the
    key's constant part (engine/rescore.py: spread_terms) and the float32 rounding allowance."""

    def __init__(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray):
        if score not in SCORES:
            raise ValueError(f"row bounds: {score} has no spread kernel")
        self.score, self.elk = score, score == "elk"
        self.mu_q = np.ascontiguousarray(mu_q, np.float64)
        lv_q = np.asarray(lv_q, np.float64)
        self.v_q = np.exp(lv_q)
        self.dim = mu_q.shape[1]
        self.g_q = np.exp(lv_q.sum(axis=1) / self.dim)
        consts = [spread_terms(score, row) for row in lv_q]
        self.c = consts[0][0] if consts else 1.0
        self.key_const = np.array([key for _, key in consts], np.float64)
        # float32 evaluation: the dot product's worst case plus a few roundings per row
        self.err = (self.dim + 16) * 2.0 ** -23

    def topk(self, table, lists: np.ndarray, first: int, k: int, out: tuple,
             queries: slice = slice(None)) -> None:
        """The exact top k of the queries `queries` (of the Q) over their probed lists `lists`
        [q, P] (-1 = none) of the block table `table` (engine/block_table.py), in one compiled
        call (engine/table_kernels.py: batch_guaranteed_topk). out: (ids [q, k], μ [q, k, D],
        log_var float16 [q, k, D], keys [q, k], shortlist sizes [q]) of those queries, written
        in place. Every query's lists must hold at least `first` ≥ k rows (the probe widens
        until they do)."""
        ids, mu, lv, keys, sizes = out
        table_kernels.batch_guaranteed_topk(
            table.addresses, table.rows, np.ascontiguousarray(lists, np.int64),
            table.code_type or np.float32, self.mu_q[queries], self.v_q[queries],
            self.g_q[queries], self.err, self.c, self.elk, self.key_const[queries],
            half_exp_table(), first, k, ids, mu, lv.view(np.uint16), keys, sizes)


class QueryBounds:
    """One query's terms (QueryTerms), applied to blocks given as a list."""

    def __init__(self, score: str, mu_q: np.ndarray, lv_q: np.ndarray):
        self.terms = QueryTerms(score, mu_q[None], lv_q[None])

    def blocks(self, parts: list) -> np.ndarray:
        """[Σ n] upper bounds on the rank key (higher is better) of the rows of format-4 blocks,
        in the order of their concatenation: one compiled pass per block (engine/kernels.py)."""
        t = self.terms
        out = np.empty(sum(len(p.ids) for p in parts), np.float32)
        end = 0
        for p in parts:
            if len(p.ids):
                at, end = end, end + len(p.ids)
                kernels.row_bound_keys(p.codes, p.terms, p.ref, p.geo, t.mu_q[0], t.v_q[0],
                                       t.g_q[0], t.err, t.c, t.elk, t.key_const[0],
                                       out[at:end])
        return out

    def topk(self, parts: list, first: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, keys) of the exact top k over the rows of the format-4 blocks `parts`, best
        first, and the number of rows scored exactly: QueryTerms.topk on a table of these
        blocks alone."""
        if sum(len(p.ids) for p in parts) < max(first, k):
            raise ValueError(f"row bounds: fewer than k = {k} rows in the probed lists")
        table, numbers = BlockTable.of_blocks(parts)
        dim = self.terms.dim
        out = (np.empty((1, k), np.int64), np.empty((1, k, dim), np.float32),
               np.empty((1, k, dim), np.float16), np.empty((1, k), np.float32),
               np.empty(1, np.int64))
        self.terms.topk(table, numbers[None], first, k, out)
        return out[0][0], out[3][0], int(out[4][0])
