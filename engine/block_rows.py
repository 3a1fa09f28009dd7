"""Rows of a query's probed list blocks (indexer/lists.py), addressed by their position in the
blocks' concatenation: copies of chosen rows, and csd's exact top k over all of them. The
loops are compiled (engine/kernels.py); engine/batch.py calls these per query."""
from __future__ import annotations

import numpy as np
import torch

from engine import kernels


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
    return torch.from_numpy(log_var16).float().numpy()   # ~10x numpy's float16 conversion
