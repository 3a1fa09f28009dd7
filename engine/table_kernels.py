"""The guaranteed search of a batch, compiled (numba): each query's exact top k over its probed
list blocks by the row bounds of engine/kernels.py, the blocks read through a table of their
arrays' addresses (engine/block_table.py fills it). Same compilation rules as engine/kernels.py:
nogil, cached beside this file.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from engine.kernels import _margin, row_bound_keys, spread_key

# The batch search reads decoded list blocks through a table of their arrays' addresses
# (engine/block_table.py), one row per inverted list, one column per array, so that one call
# searches a whole piece of a batch: numba takes a tuple of arrays only at a length fixed when
# it compiles, and handing over each query's blocks as arguments cost ~25 µs of Python a query.
FIELDS = ("ids", "codes", "terms", "ref", "geo", "mu", "lv_bits")
_IDS, _CODES, _TERMS, _REF, _GEO, _MU, _LV = range(len(FIELDS))


@intrinsic
def _pointer_at(typingctx, address, dtype):
    """A typed pointer to the memory at `address` (an int64 from ndarray.ctypes.data)."""
    pointer = types.CPointer(dtype.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return pointer(address, dtype), codegen


@njit(nogil=True, cache=True)
def _field(table, lst, col, shape, dtype):
    """The array in column `col` of list `lst`'s row of a block table, as a view."""
    return carray(_pointer_at(table[lst, col], dtype), shape)


@njit(nogil=True, cache=True)
def guaranteed_topk(table, nrows, which, code_type, mu_q, v_q, g_q, err, c, elk, key_const,
                    half_exp, first, k, out_rows, out_keys):
    """One query's exact top k over the blocks of the lists `which` (rows of the block table
    `table`, none empty; nrows: rows per list; code_type: the dtype of the bound's codes) by
    the row bounds, in one call: every row's bound from μ's codes (row_bound_keys), the `first`
    rows of best bound scored exactly from float32 μ (spread_key), then every row whose bound
    beats the k-th key less the rescoring margin (indexer/variance.py: margin). Writes the k
    best rows' positions (in the blocks' concatenation) and keys, best first; returns the
    number of rows scored exactly (the shortlist)."""
    nb = len(which)
    dim = len(mu_q)
    starts = np.zeros(nb + 1, np.int64)
    for b in range(nb):
        starts[b + 1] = starts[b] + nrows[which[b]]
    total = starts[nb]
    rank = np.empty(total, np.float32)
    for b in range(nb):
        lst, n = which[b], nrows[which[b]]
        row_bound_keys(_field(table, lst, _CODES, (n, dim), code_type),
                       _field(table, lst, _TERMS, (4, n), np.float32),
                       _field(table, lst, _REF, (dim + 1,), np.float32),
                       _field(table, lst, _GEO, (n,), np.float64), mu_q, v_q, g_q, err, c,
                       elk, key_const, rank[starts[b]:starts[b + 1]])
    first = min(first, total)
    cut = np.partition(rank, total - first)[total - first]   # the first-th best bound
    rows = np.empty(total, np.int64)
    keys = np.empty(total, np.float32)
    scored = np.zeros(total, np.bool_)
    m = 0
    for level in range(2):   # above the cut, then equal to it until `first` are taken
        for r in range(total):
            if m < first and not scored[r] and (rank[r] > cut if level == 0 else rank[r] == cut):
                rows[m] = r
                scored[r] = True
                m += 1
    order = np.argsort(rows[:m])   # block by block: each block's views are made once
    b = 0
    for j in order:
        r = rows[j]
        while r >= starts[b + 1]:
            b += 1
        keys[j] = _row_key(table, which[b], r - starts[b], nrows, mu_q, v_q, c, half_exp,
                           elk, key_const)
    kth = np.partition(keys[:m], m - k)[m - k]
    below = _margin(kth)
    for b in range(nb):
        for r in range(starts[b], starts[b + 1]):
            if not scored[r] and rank[r] > below:
                rows[m] = r
                keys[m] = _row_key(table, which[b], r - starts[b], nrows, mu_q, v_q, c,
                                   half_exp, elk, key_const)
                m += 1
    best = np.argsort(-keys[:m], kind="mergesort")[:k]
    for j in range(len(best)):
        out_rows[j] = rows[best[j]]
        out_keys[j] = keys[best[j]]
    return m


@njit(nogil=True, cache=True)
def _row_key(table, lst, i, nrows, mu_q, v_q, c, half_exp, elk, key_const):
    """spread_key of row i of list `lst`'s block."""
    n, dim = nrows[lst], len(mu_q)
    return spread_key(mu_q, v_q, c, _field(table, lst, _MU, (n, dim), np.float32),
                      _field(table, lst, _LV, (n, dim), np.uint16),
                      _field(table, lst, _TERMS, (4, n), np.float32)[1], half_exp, i, elk,
                      key_const)


@njit(nogil=True, cache=True)
def batch_guaranteed_topk(table, nrows, lists, code_type, mu_q, v_q, g_q, err, c, elk,
                          key_const, half_exp, first, k, out_ids, out_mu, out_lv, out_keys,
                          out_sizes):
    """guaranteed_topk of each query q of a batch over its probed lists lists[q] (-1 = none),
    its terms mu_q[q], v_q[q], g_q[q], key_const[q] (engine/row_bounds.py: QueryTerms); then
    the k hits' ids, μ and float16 log-variance bits copied out (p_match reads them) with
    their keys and each query's shortlist size."""
    dim = mu_q.shape[1]
    which = np.empty(lists.shape[1], np.int64)
    rows = np.empty(k, np.int64)
    for q in range(lists.shape[0]):
        nb = 0
        for lst in lists[q]:
            if lst >= 0 and nrows[lst] > 0:
                which[nb] = lst
                nb += 1
        out_sizes[q] = guaranteed_topk(table, nrows, which[:nb], code_type, mu_q[q], v_q[q],
                                       g_q[q], err, c, elk, key_const[q], half_exp, first, k,
                                       rows, out_keys[q])
        for j in range(k):
            r, b = rows[j], 0
            while r >= nrows[which[b]]:
                r -= nrows[which[b]]
                b += 1
            lst, n = which[b], nrows[which[b]]
            out_ids[q, j] = _field(table, lst, _IDS, (n,), np.int64)[r]
            out_mu[q, j, :] = _field(table, lst, _MU, (n, dim), np.float32)[r]
            out_lv[q, j, :] = _field(table, lst, _LV, (n, dim), np.uint16)[r]
