"""The guaranteed shortlist of engine/batch.py, read from whole inverted lists (store formats
3 to 6, indexer/lists.py): per query, every row of its probed lists is a candidate (the set
the ANN stage ranks), so no FAISS range search is ever needed.

- elk and bhattacharyya on format-4 blocks bound each row on its own (engine/row_bounds.py):
  the `first` rows of best bound are scored exactly, then only rows whose bound beats the k-th
  key; one compiled call per piece of the batch (engine/table_kernels.py: batch_guaranteed_topk),
  reading the blocks through their table of addresses (engine/block_table.py);
- csd scores every probed row in one compiled pass (engine/block_rows.py: csd_topk);
- the rest (w2, mc, format 3) take the rows in order of ⟨μ_q, μ⟩, rescore the first `first`,
  then every row above the inner product that one bound for all rows requires
  (indexer/variance.py: required_ip), query by query.

engine/batch.py imports this module on the first search of an index with list blocks: its
compiled loops load numba (~0.2 s), which a flat index, e.g. a one-shot query on the built-in
scenes, never needs.
"""
from __future__ import annotations

import time

import numpy as np
from core.timing import elapsed_ms

from engine import block_rows, row_bounds
from engine.batch import BatchResult
from engine.block_table import BlockTable
from engine.probe import probe_lists
from engine.block_rows import IN_PLACE, block_row_keys
from engine.rescore import CHUNK_FLOATS, rescore_gathered
from engine.shortlist import kth_key
from indexer.variance import required_ip


class ListSearch:
    """Guaranteed search of one modality's list blocks `blocks` (indexer/lists.py: ListBlocks);
    a, b, mc_samples: the `mc` score's parameters. `pieces(run, n, timings)` runs
    `run(range of queries, timings)` over a batch of n queries, on the batch's threads."""

    def __init__(self, blocks, a: float, b: float, mc_samples: int, pieces):
        self.blocks, self.a, self.b, self.mc_samples = blocks, a, b, mc_samples
        self.pieces = pieces
        self.table = BlockTable(blocks.ivf.nlist, blocks.read)   # filled as lists are read

    def search(self, mu_q, lv_q, k, score, first, bounds) -> BatchResult:
        """Top k of each query of a batch ([Q, D] float32), with at least `first` ≥ k rows
        scored; `bounds`: the modality's VarianceBounds, None for a fixed shortlist."""
        blocks = self.blocks
        timings = {"ann_ms": 0.0, "fetch_ms": 0.0, "rescore_ms": 0.0}
        t = time.perf_counter()
        lists = list(probe_lists(blocks, mu_q))
        short = np.flatnonzero(blocks.sizes(np.stack(lists)).sum(axis=1) < first).tolist()
        while short and len(lists[short[0]]) < blocks.ivf.nlist:  # too few rows: more lists
            wider = blocks.probe(mu_q[short], 2 * len(lists[short[0]]))
            for i, row in zip(short, wider):
                lists[i] = row
            short = [i for i in short if blocks.sizes(lists[i]).sum() < first]
        timings["ann_ms"] += elapsed_ms(t)
        dim = mu_q.shape[1]
        out = (np.empty((len(mu_q), k), np.int64), np.empty((len(mu_q), k, dim), np.float32),
               np.empty((len(mu_q), k, dim), np.float16))   # the hits: ids, μ, log_var
        keys, sizes = np.empty((len(mu_q), k), np.float32), np.empty(len(mu_q), np.int64)

        if bounds is not None and score in row_bounds.SCORES and blocks.row_stats:
            timings["bound_ms"] = 0.0
            table, terms = self.table, row_bounds.QueryTerms(score, mu_q, lv_q)
            probed = np.full((len(lists), max(len(row) for row in lists)), -1, np.int64)
            for i, row in enumerate(lists):
                probed[i, :len(row)] = row

            def run(queries: range, times: dict) -> None:
                piece = slice(queries.start, queries.stop)
                t = time.perf_counter()
                table.ensure(probed[piece])   # blocks decoded once, kept
                times["fetch_ms"] += elapsed_ms(t)
                t = time.perf_counter()
                terms.topk(table, probed[piece], first, k,
                           tuple(o[piece] for o in (*out, keys, sizes)), piece)
                times["bound_ms"] += elapsed_ms(t)
        else:
            def run(queries: range, times: dict) -> None:
                read = blocks.read   # decoded once, kept (indexer/lists.py)
                for i in queries:
                    t = time.perf_counter()
                    parts = [read(int(n)) for n in lists[i] if n >= 0]
                    times["fetch_ms"] += elapsed_ms(t)
                    hits, keys[i], sizes[i] = self._one_query(parts, mu_q[i], lv_q[i], k,
                                                              score, first, bounds, times)
                    block_rows.gather_rows(parts, hits, tuple(o[i] for o in out))   # p_match

        self.pieces(run, len(mu_q), timings)
        return BatchResult(out[0], keys, sizes, timings,
                           (out[1], block_rows.half_to_float(out[2])))

    def _one_query(self, parts, mu_q, lv_q, k, score, first, bounds, timings):
        """(positions of the top k in the concatenation of the blocks `parts`, their keys, the
        shortlist's size) of one query over its probed blocks, by csd's pass or one bound for
        all rows (the module's docstring)."""
        t = time.perf_counter()
        if score == "csd" and bounds is not None and self.blocks.row_stats:
            found = block_rows.csd_topk(parts, mu_q, lv_q, k)   # exact for every row: no bound
            timings["rescore_ms"] += elapsed_ms(t)
            return found
        # rows in order of ⟨μ_q, μ⟩, one bound for all (indexer/variance.py)
        ip = np.concatenate([p.mu @ mu_q for p in parts])
        timings["ann_ms"] += elapsed_ms(t)
        pick = np.argpartition(-ip, first - 1)[:first] if first < len(ip) \
            else np.arange(len(ip))
        keys = self._rescore_rows(score, mu_q, lv_q, parts, pick, timings)
        if bounds is not None:
            t_req = required_ip(score, kth_key(keys, k), mu_q, lv_q, bounds)
            more = np.flatnonzero(ip > t_req)
            more = more[~_marked(len(ip), pick)[more]]
            if len(more):
                keys = np.concatenate([keys, self._rescore_rows(score, mu_q, lv_q, parts, more,
                                                                timings)])
                pick = np.concatenate([pick, more])
        top = np.argsort(-keys, kind="stable")[:k]
        return pick[top], keys[top], len(pick)

    def _rescore_rows(self, score, mu_q, lv_q, parts, rows, timings) -> np.ndarray:
        """Keys of the items at positions `rows` of the concatenated list blocks `parts`: the
        closed forms in place (engine/block_rows.py: block_row_keys), mc gathered and scored a
        cache-sized piece at a time."""
        t = time.perf_counter()
        if score in IN_PLACE:
            keys = block_row_keys(score, mu_q, lv_q, parts, rows)
            timings["rescore_ms"] += elapsed_ms(t)
            return keys
        keys = np.empty(len(rows), np.float32)
        step = max(1, CHUNK_FLOATS // len(lv_q))        # rows per piece (lv_q is one query)
        for s in range(0, len(rows), step):
            ids, mu, lv = block_rows.gather_rows(parts, rows[s:s + step])
            lv = block_rows.half_to_float(lv)
            keys[s:s + step] = rescore_gathered(score, mu_q[None], lv_q[None], mu[None],
                                                lv[None], ids[None], self.a, self.b,
                                                self.mc_samples)[0]
        timings["rescore_ms"] += elapsed_ms(t)  # gather and math together: they interleave
        return keys


def _marked(n: int, rows: np.ndarray) -> np.ndarray:
    """[n] bool, True at `rows` (cheaper than np.isin for a few hundred of a few thousand)."""
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask
