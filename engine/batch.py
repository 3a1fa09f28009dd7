"""Search many queries at once: one ANN call, one store read and one rescoring call for the
batch, then one more read and rescore of whatever the bound says could still win.

Stages are timed separately (ann, fetch, rescore) because they scale differently: ANN with
nprobe and N, fetch with the shortlist length (LMDB reads), rescore with shortlist × D.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from indexer import augmented as aug

from core.errors import PcmeError
from engine.exact import ExactSearcher
from core.montecarlo import MC_SAMPLES
from core.scores import score_name
from engine.rescore import CHUNK_FLOATS, IN_PLACE, block_row_keys, rescore_gathered
from engine.shortlist import BOUNDED, kth_key, prefetch_depth, shortlist_size
from engine import block_rows, row_bounds
from engine.block_table import BlockTable
from engine.probe import probe_lists
from indexer.variance import VarianceBounds, required_ip

logger = logging.getLogger(__name__)

MIN_PER_THREAD = 4      # queries a piece of a batch must have to be worth a thread's hand-off
CHUNKS_PER_THREAD = 4   # pieces per thread: one slow query delays a quarter of a share, not all


def default_threads() -> int:
    """Search threads of a batch: the cores this process may use (all of them where the
    platform cannot say, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class BatchResult:
    ids: np.ndarray                # [Q, k] best first
    keys: np.ndarray               # [Q, k] rank keys (higher is better; distances negated)
    shortlist: np.ndarray          # [Q] candidates rescored per query (N for exact search)
    timings_ms: dict               # per stage, summed over the batch
    vectors: tuple | None = None   # (μ, log_var) [Q, k, D] of the hits when already read


class BatchSearcher:
    """Shortlist search with the recall guarantee, exact search and augmented search for one
    index; `a`, `b` are the match-probability parameters of the `mc` score. `initial` sets
    the first shortlist's length; `guarantee=False` keeps it fixed (no bound, no growth):
    the calibrated mode, whose recall `bench --shortlist N` measures. `lists=False` reads a
    shortlist id by id even where the store has list blocks (the format-2 path). A batch read
    from list blocks runs on `threads` threads (default: the usable cores), which take its
    queries in contiguous pieces: the row kernels release the GIL (engine/kernels.py).
    `close()` stops the threads."""

    def __init__(self, reader, a: float, b: float, initial: int | None = None,
                 guarantee: bool = True, mc_samples: int = MC_SAMPLES, lists: bool = True,
                 threads: int | None = None):
        self.reader, self.a, self.b, self.initial = reader, a, b, initial
        self.lists = lists
        self.threads = threads or default_threads()
        self._pool: ThreadPoolExecutor | None = None
        self.mc_samples = mc_samples
        self.guarantee = guarantee
        self._exact: dict[str, ExactSearcher] = {}
        self._bound_cache: dict[str, VarianceBounds | None] = {}
        self._tables: dict[str, tuple] = {}   # modality: (its ListBlocks, their BlockTable)

    def exact(self, modality: str) -> ExactSearcher:
        if modality not in self._exact:
            self._exact[modality] = ExactSearcher(self.reader, modality)
        return self._exact[modality]

    def search(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int, score: str,
               exact: bool = False) -> BatchResult:
        score = score_name(score)
        n = self.reader.count(modality)
        if k < 1:
            raise PcmeError(f"--k {k}: must be at least 1")
        if mu_q.ndim != 2 or mu_q.shape != lv_q.shape:
            raise PcmeError(f"search: queries must be [Q, D] arrays, got {mu_q.shape}, {lv_q.shape}")
        mu_q, lv_q = mu_q.astype(np.float32), lv_q.astype(np.float32)
        k = min(k, n)
        if exact:
            t = time.perf_counter()
            ids, keys = self.exact(modality).topk(score, mu_q, lv_q, k, self.a, self.b,
                                                     self.mc_samples)
            return BatchResult(ids, keys, np.full(len(mu_q), n), {"exact_ms": _ms(t)})
        index = self.reader.augmented(modality, score)
        if index is not None:
            t = time.perf_counter()
            ids, raw = aug.search(index, score, mu_q, lv_q, k)
            return BatchResult(ids, -raw, np.full(len(mu_q), k), {"ann_ms": _ms(t)})
        return self._shortlist(modality, mu_q, lv_q, k, score, n)

    def _shortlist(self, modality, mu_q, lv_q, k, score, n) -> BatchResult:
        """One ANN call returns `prefetch_depth` candidates by ⟨μ_q, μ_d⟩; the first `first`
        are fetched and rescored; the bound then says, per query, which further prefix of
        that same list could still enter the top-k (one more fetch and rescore for the batch).
        Only a query whose threshold lies beyond the list needs a FAISS range search. A store
        with list blocks (format 3) serves the same shortlist from whole lists (_from_lists)."""
        timings = {"ann_ms": 0.0, "fetch_ms": 0.0, "rescore_ms": 0.0}
        if not len(mu_q):
            return BatchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                               np.zeros(0, np.int64), timings)
        bounds = self._bounds(modality) if self.guarantee and score in BOUNDED else None
        first = k if score == "mu" else max(k, self.initial or shortlist_size(k, n, score))
        blocks = self.reader.list_blocks(modality) if score != "mu" and self.lists else None
        if blocks is not None:
            return self._from_lists(blocks, mu_q, lv_q, k, score, min(first, n), bounds)
        depth = prefetch_depth(k, n, first) if bounds is not None and score != "mu" else first
        t = time.perf_counter()
        ids, ip = self.reader.search(modality, mu_q, min(depth, n), min_fill=first)
        timings["ann_ms"] += _ms(t)
        if score == "mu":  # the ANN ranking is the answer: no σ needed
            return BatchResult(ids, ip, np.full(len(ids), ids.shape[1]), timings)
        head = min(first, ids.shape[1])  # min_fill: the first `first` of every row are ids
        keys = self._rescore(modality, score, mu_q, lv_q, ids[:, :head], timings)
        lists = [(ids[i, :head], keys[i]) for i in range(len(mu_q))]
        if bounds is not None:
            lists = self._complete(modality, mu_q, lv_q, k, score, n, ids, ip, lists, bounds,
                                   timings)
        out_ids, out_keys, sizes = [], [], []
        for c_ids, c_keys in lists:
            top = np.argsort(-c_keys, kind="stable")[:k]
            out_ids.append(c_ids[top]), out_keys.append(c_keys[top]), sizes.append(len(c_ids))
        return BatchResult(np.stack(out_ids), np.stack(out_keys), np.asarray(sizes), timings)

    def _from_lists(self, blocks, mu_q, lv_q, k, score, first, bounds) -> BatchResult:
        """The same shortlist as below, read from whole inverted lists (indexer/lists.py):
        per query, the exact inner product with every item of its probed lists (the set the
        ANN stage ranks), the `first` best rescored, then every item the bound cannot rule
        out. No FAISS range search is needed: the probed lists are all there. With format-4
        blocks, elk and bhattacharyya bound each row on its own (engine/row_bounds.py): the
        first are the rows of best bound, and only rows whose bound beats the k-th key follow."""
        timings = {"ann_ms": 0.0, "fetch_ms": 0.0, "rescore_ms": 0.0}
        t = time.perf_counter()
        lists = list(probe_lists(blocks, mu_q))
        short = np.flatnonzero(blocks.sizes(np.stack(lists)).sum(axis=1) < first).tolist()
        while short and len(lists[short[0]]) < blocks.ivf.nlist:  # too few rows: more lists
            wider = blocks.probe(mu_q[short], 2 * len(lists[short[0]]))
            for i, row in zip(short, wider):
                lists[i] = row
            short = [i for i in short if blocks.sizes(lists[i]).sum() < first]
        timings["ann_ms"] += _ms(t)
        dim = mu_q.shape[1]
        out = (np.empty((len(mu_q), k), np.int64), np.empty((len(mu_q), k, dim), np.float32),
               np.empty((len(mu_q), k, dim), np.float16))   # the hits: ids, μ, log_var
        keys, sizes = np.empty((len(mu_q), k), np.float32), np.empty(len(mu_q), np.int64)
        chunks = _split(len(mu_q), 1 if self.threads == 1 else CHUNKS_PER_THREAD * self.threads)

        if bounds is not None and score in row_bounds.SCORES and blocks.row_stats:
            # each row's own bound, and the rescoring it drives: one compiled call per piece
            timings["bound_ms"] = 0.0
            table, terms = self._table(blocks), row_bounds.QueryTerms(score, mu_q, lv_q)
            probed = np.full((len(lists), max(len(row) for row in lists)), -1, np.int64)
            for i, row in enumerate(lists):
                probed[i, :len(row)] = row

            def run(queries: range, times: dict) -> None:
                t = time.perf_counter()
                table.ensure(probed[queries.start:queries.stop])   # decoded once, kept
                times["fetch_ms"] += _ms(t)
                t = time.perf_counter()
                piece = slice(queries.start, queries.stop)
                terms.topk(table, probed[piece], first, k,
                           tuple(o[piece] for o in (*out, keys, sizes)), piece)
                times["bound_ms"] += _ms(t)
        else:
            def run(queries: range, times: dict) -> None:
                read = blocks.read   # decoded once, kept (indexer/lists.py)
                for i in queries:
                    t = time.perf_counter()
                    parts = [read(int(n)) for n in lists[i] if n >= 0]
                    times["fetch_ms"] += _ms(t)
                    hits, keys[i], sizes[i] = self._from_blocks(parts, mu_q[i], lv_q[i], k,
                                                                score, first, bounds,
                                                                blocks.row_stats, times)
                    block_rows.gather_rows(parts, hits, tuple(o[i] for o in out))   # p_match

        if len(chunks) == 1:
            run(chunks[0], timings)
        else:   # the kernels release the GIL: one thread per core (see __init__)
            times = [dict.fromkeys(timings, 0.0) for _ in chunks]
            list(self._workers().map(run, chunks, times))
            for name in timings:
                timings[name] += sum(tm[name] for tm in times)
        return BatchResult(out[0], keys, sizes, timings, (out[1], block_rows.half_to_float(out[2])))

    def _from_blocks(self, parts, mu_q, lv_q, k, score, first, bounds, row_stats, timings):
        """(positions of the top k in the concatenation of the blocks `parts`, their keys, the
        shortlist's size) of one query over its probed blocks; `row_stats`: format-4 blocks
        (elk and bhattacharyya on those take the block table instead: _from_lists)."""
        t = time.perf_counter()
        if score == "csd" and bounds is not None and row_stats:
            found = block_rows.csd_topk(parts, mu_q, lv_q, k)   # exact for every row: no bound
            timings["rescore_ms"] += _ms(t)
            return found
        # rows in order of ⟨μ_q, μ⟩, one bound for all (indexer/variance.py)
        ip = np.concatenate([p.mu @ mu_q for p in parts])
        timings["ann_ms"] += _ms(t)
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

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batch")
        return self._pool

    def _table(self, blocks) -> BlockTable:
        """The block table of a modality's list blocks (engine/block_table.py), made once."""
        held = self._tables.get(blocks.modality)
        if held is None or held[0] is not blocks:
            held = self._tables[blocks.modality] = (blocks, BlockTable(blocks.ivf.nlist,
                                                                       blocks.read))
        return held[1]

    def close(self) -> None:
        self._tables.clear()   # they point into the reader's blocks
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _rescore_rows(self, score, mu_q, lv_q, parts, rows, timings) -> np.ndarray:
        """Keys of the items at positions `rows` of the concatenated list blocks `parts`: the
        closed forms in place (engine/rescore.py: block_row_keys), mc gathered and scored a
        cache-sized piece at a time."""
        t = time.perf_counter()
        if score in IN_PLACE:
            keys = block_row_keys(score, mu_q, lv_q, parts, rows)
            timings["rescore_ms"] += _ms(t)
            return keys
        keys = np.empty(len(rows), np.float32)
        step = max(1, CHUNK_FLOATS // len(lv_q))        # rows per piece (lv_q is one query)
        for s in range(0, len(rows), step):
            ids, mu, lv = block_rows.gather_rows(parts, rows[s:s + step])
            lv = block_rows.half_to_float(lv)
            keys[s:s + step] = rescore_gathered(score, mu_q[None], lv_q[None], mu[None],
                                                lv[None], ids[None], self.a, self.b,
                                                self.mc_samples)[0]
        timings["rescore_ms"] += _ms(t)  # gather and math together: they interleave
        return keys

    def _complete(self, modality, mu_q, lv_q, k, score, n, ids, ip, lists, bounds, timings):
        """Add to each query's shortlist every item the bound cannot rule out.

        The bounds are linear in ‖Δμ‖², so the k-th best key gives, in closed form, the inner
        product t below which no item can compete (indexer/variance.py). Items above t are a
        prefix of the ANN list (sorted by inner product) unless the list ends above t; then a
        range search finds them. More candidates can only raise the k-th key: one round."""
        extra_q, extra_ids = [], []
        for i, (c_ids, c_keys) in enumerate(lists):
            t_req = required_ip(score, kth_key(c_keys, k), mu_q[i], lv_q[i], bounds)
            valid = int((ids[i] >= 0).sum())  # fewer than asked: the probed lists are exhausted
            above = int(np.searchsorted(-ip[i, :valid], -t_req, side="left"))  # ip > t_req
            if above < valid or valid < ids.shape[1] or ids.shape[1] == n:
                more = ids[i, len(c_ids):above]
            else:  # the whole ANN list is above t: it may not hold every such item
                t = time.perf_counter()
                found, _ = self.reader.range_search(modality, mu_q[i], t_req)
                timings["ann_ms"] += _ms(t)
                more = found[~np.isin(found, c_ids)]
            extra_q.append(np.full(len(more), i)), extra_ids.append(more)
        extra_q, extra_ids = np.concatenate(extra_q), np.concatenate(extra_ids)
        if not len(extra_ids):
            return lists
        keys = self._rescore_pairs(modality, score, mu_q, lv_q, extra_q, extra_ids, timings)
        bounds_at = np.searchsorted(extra_q, np.arange(len(lists) + 1))
        return [(np.concatenate([c_ids, extra_ids[a:b]]), np.concatenate([c_keys, keys[a:b]]))
                for (c_ids, c_keys), a, b in zip(lists, bounds_at[:-1], bounds_at[1:])]

    def _rescore(self, modality, score, mu_q, lv_q, ids, timings) -> np.ndarray:
        """Rank keys [Q, M] of each query's own ids [Q, M]. `mc` draws per query: it keeps one
        gathered [Q, M, D] call; the closed forms go pair by pair (_rescore_pairs)."""
        if score != "mc":
            query_of = np.repeat(np.arange(len(mu_q)), ids.shape[1])
            return self._rescore_pairs(modality, score, mu_q, lv_q, query_of, ids.reshape(-1),
                                       timings).reshape(ids.shape)
        mu, lv, rows = self._fetch(modality, ids, timings)
        t = time.perf_counter()
        keys = rescore_gathered(score, mu_q, lv_q, mu[rows], lv[rows], ids, self.a, self.b,
                                self.mc_samples)
        timings["rescore_ms"] += _ms(t)
        return keys

    def _rescore_pairs(self, modality, score, mu_q, lv_q, query_of, ids, timings) -> np.ndarray:
        """Keys [P] of the pairs (query query_of[p], item ids[p]): one store read for the
        union, then cache-sized pieces of pairs per kernel call (engine/rescore.py).
        Gathering a batch into one [Q, M, D] array first costs more than the math (64 queries
        × 800 items × 256 dims is 50 MB per operand, and every kernel step makes another)."""
        mu, lv, rows = self._fetch(modality, ids, timings)
        t = time.perf_counter()
        keys = np.empty(len(ids), np.float32)
        step = max(1, CHUNK_FLOATS // mu_q.shape[1])
        for s in range(0, len(ids), step):
            part, q, r = slice(s, s + step), query_of[s:s + step], rows[s:s + step]
            keys[part] = rescore_gathered(score, mu_q[q], lv_q[q], mu[r][:, None],
                                          lv[r][:, None], ids[part][:, None], self.a, self.b,
                                          self.mc_samples)[:, 0]
        timings["rescore_ms"] += _ms(t)
        return keys

    def _fetch(self, modality, ids: np.ndarray, timings):
        """(μ [U, D], log_var [U, D], rows: ids' positions in them) for the U distinct ids,
        read in one store transaction."""
        t = time.perf_counter()
        uniq, inverse = np.unique(ids, return_inverse=True)
        mu, lv = self.reader.fetch(modality, uniq)
        timings["fetch_ms"] += _ms(t)
        return mu, lv, inverse.reshape(ids.shape)

    def _bounds(self, modality) -> VarianceBounds | None:
        if modality not in self._bound_cache:
            self._bound_cache[modality] = self._read_bounds(modality)
        return self._bound_cache[modality]

    def _read_bounds(self, modality) -> VarianceBounds | None:
        stats = self.reader.variance_stats(modality)
        if stats is None:
            logger.warning("%s: no variance_stats in the manifest (older build): fixed shortlist, "
                           "no recall guarantee", self.reader.index_dir)
            return None
        return VarianceBounds.from_json(stats)


def _split(n: int, parts: int) -> list[range]:
    """0..n−1 in at most `parts` contiguous ranges of at least MIN_PER_THREAD queries (the
    threads take them in turn as they finish)."""
    parts = max(1, min(parts, n // MIN_PER_THREAD))
    cuts = np.linspace(0, n, parts + 1).astype(int)
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def _marked(n: int, rows: np.ndarray) -> np.ndarray:
    """[n] bool, True at `rows` (cheaper than np.isin for a few hundred of a few thousand)."""
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
