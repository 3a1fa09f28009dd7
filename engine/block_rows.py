"""Rows of a query's probed list blocks (indexer/lists.py), addressed by their position in the
blocks' concatenation: copies of chosen rows, and csd's exact top k over all of them. The
loops are compiled (engine/kernels.py); engine/list_search.py calls these per query."""
from __future__ import annotations

import numpy as np

from core.errors import PcmeError
from core.scores import score_name
from engine import kernels
from engine.rescore import half_exp_table, half_value_table, spread_terms

IN_PLACE = ("elk", "bhattacharyya", "csd", "w2")   # the closed forms block_row_keys scores


def csd_topk(parts, mu_q: np.ndarray, lv_q: np.ndarray, k: int) -> tuple:
    """(positions, keys, rows scored) of the exact csd top k over every row of the blocks
    `parts`: csd is an inner product plus per-row terms (engine/kernels.py: csd_keys), so one
    pass over the probed lists scores all of them, as the guaranteed shortlist would
    (indexer/variance.py bounds it to the same top k)."""
    mu64 = mu_q.astype(np.float64)
    const = float(mu64 @ mu64) + float(np.exp(lv_q.astype(np.float32)).sum(dtype=np.float64))
    keys = np.empty(sum(len(p.ids) for p in parts), np.float32)
    first = 0
    for p in parts:
        if len(p.ids):
            kernels.csd_keys(p.mu, p.sq_norm, p.var_sum, mu64, const,
                             keys[first:first + len(p.ids)])
        first += len(p.ids)
    top = np.argpartition(-keys, k - 1)[:k] if k < len(keys) else np.arange(len(keys))
    top = top[np.argsort(-keys[top], kind="stable")]
    return top, keys[top], len(keys)


def gather_rows(parts, rows: np.ndarray, out: tuple | None = None) -> tuple:
    """(ids, μ, log_var float16) of the rows at positions `rows` (any order) of the
    concatenated list blocks `parts`, copied into `out` (three arrays of len(rows) rows) or
    fresh arrays."""
    if out is None:
        dim = parts[0].mu.shape[1]
        out = (np.empty(len(rows), np.int64), np.empty((len(rows), dim), np.float32),
               np.empty((len(rows), dim), np.float16))
    rows, first = np.ascontiguousarray(rows, np.int64), 0
    for p in parts:
        kernels.copy_rows(p.ids, p.mu, p.log_var.view(np.uint16), rows, first, out[0], out[1],
                          out[2].view(np.uint16))
        first += len(p.ids)
    return out


def half_to_float(log_var16: np.ndarray) -> np.ndarray:
    """float16 [n, D] -> float32, through a table (engine/kernels.py: half_values)."""
    out = np.empty(log_var16.shape, np.float32)
    kernels.half_values(np.ascontiguousarray(log_var16).view(np.uint16), half_value_table(), out)
    return out


def block_row_keys(score: str, mu_q: np.ndarray, lv_q: np.ndarray, parts: list,
                   rows: np.ndarray) -> np.ndarray:
    """Rank keys [M] of a closed-form score (IN_PLACE) of one query ([D], float32) against the
    rows at positions `rows` of the concatenated list blocks `parts` (indexer/lists.py), read
    in place: no gathered copy, the float16 log variances through an exp table
    (engine/kernels.py). The same numbers as rescore_gathered to float32 rounding
    (tests/test_list_blocks.py compares both with a float64 brute force)."""
    score = score_name(score)
    if score not in IN_PLACE:
        raise PcmeError(f"rescore: {score} is not a closed form")
    keys = np.empty(len(rows), np.float32)
    rows = np.ascontiguousarray(rows, np.int64)
    c, key_const = spread_terms(score, lv_q)
    mu_q, v_q, table = mu_q.astype(np.float32), np.exp(lv_q.astype(np.float32)), half_exp_table()
    first = 0
    for p in parts:
        if len(p.ids) and score in ("csd", "w2"):
            kernels.distance_row_keys(score == "w2", mu_q, v_q, p.mu, p.log_var.view(np.uint16),
                                      table, rows, first, keys)
        elif len(p.ids):
            lv_sum = p.lv_sum if p.lv_sum is not None else p.log_var.astype(np.float32).sum(1)
            kernels.spread_row_keys(mu_q, v_q, c, p.mu, p.log_var.view(np.uint16), lv_sum,
                                    table, rows, first, score == "elk", key_const, keys)
        first += len(p.ids)
    return keys
