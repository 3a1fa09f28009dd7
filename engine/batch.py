"""Search many queries at once: one ANN call, one store read and one rescoring call for the
batch, then one more read and rescore of whatever the bound says could still win.

Stages are timed separately (ann, fetch, rescore) because they scale differently: ANN with
nprobe and N, fetch with the shortlist length (LMDB reads), rescore with shortlist × D.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from indexer import augmented as aug

from core.errors import PcmeError
from core.constants import MC_SAMPLES
from core.process import default_threads
from core.scores import score_name
from core.timing import elapsed_ms
from engine.rescore import CHUNK_FLOATS, rescore_gathered
from engine.shortlist import BOUNDED, kth_key, prefetch_depth, shortlist_size
from indexer.variance import VarianceBounds, required_ip

logger = logging.getLogger(__name__)

MIN_PER_THREAD = 4      # queries a piece of a batch must have to be worth a thread's hand-off
CHUNKS_PER_THREAD = 4   # pieces per thread: one slow query delays a quarter of a share, not all



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
        self._exact: dict = {}   # modality -> engine.exact.ExactSearcher
        self._bound_cache: dict[str, VarianceBounds | None] = {}
        self._list_search: dict[str, object] = {}   # modality: its ListSearch, made once

    def exact(self, modality: str):
        """Exhaustive search over `modality` (engine/exact.py: torch, loaded only for it)."""
        from engine.exact import ExactSearcher

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
            return BatchResult(ids, keys, np.full(len(mu_q), n), {"exact_ms": elapsed_ms(t)})
        index = self.reader.augmented(modality, score)
        if index is not None:
            t = time.perf_counter()
            ids, raw = aug.search(index, score, mu_q, lv_q, k)
            return BatchResult(ids, -raw, np.full(len(mu_q), k), {"ann_ms": elapsed_ms(t)})
        return self._shortlist(modality, mu_q, lv_q, k, score, n)

    def _shortlist(self, modality, mu_q, lv_q, k, score, n) -> BatchResult:
        """One ANN call returns `prefetch_depth` candidates by ⟨μ_q, μ_d⟩; the first `first`
        are fetched and rescored; the bound then says, per query, which further prefix of
        that same list could still enter the top-k (one more fetch and rescore for the batch).
        Only a query whose threshold lies beyond the list needs a FAISS range search. A store
        with list blocks (format 3) serves the same shortlist from whole lists
        (engine/list_search.py)."""
        timings = {"ann_ms": 0.0, "fetch_ms": 0.0, "rescore_ms": 0.0}
        if not len(mu_q):
            return BatchResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                               np.zeros(0, np.int64), timings)
        bounds = self._bounds(modality) if self.guarantee and score in BOUNDED else None
        first = k if score == "mu" else max(k, self.initial or shortlist_size(k, n, score))
        blocks = self.reader.list_blocks(modality) if score != "mu" and self.lists else None
        if blocks is not None:
            return self._lists(modality, blocks).search(mu_q, lv_q, k, score, min(first, n),
                                                        bounds)
        depth = prefetch_depth(k, n, first) if bounds is not None and score != "mu" else first
        t = time.perf_counter()
        ids, ip = self.reader.search(modality, mu_q, min(depth, n), min_fill=first)
        timings["ann_ms"] += elapsed_ms(t)
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

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batch")
        return self._pool

    def _lists(self, modality, blocks):
        """The modality's ListSearch (engine/list_search.py, imported here: it loads numba)."""
        held = self._list_search.get(modality)
        if held is None or held.blocks is not blocks:
            from engine.list_search import ListSearch
            held = self._list_search[modality] = ListSearch(blocks, self.a, self.b,
                                                            self.mc_samples, self._in_pieces)
        return held

    def _in_pieces(self, run, n: int, timings: dict) -> None:
        """run(range, timings) over 0..n−1 in contiguous pieces on the batch's threads (the
        kernels release the GIL: one thread per core), their timings summed into `timings`."""
        chunks = _split(n, 1 if self.threads == 1 else CHUNKS_PER_THREAD * self.threads)
        if len(chunks) == 1:
            run(chunks[0], timings)
            return
        times = [dict.fromkeys(timings, 0.0) for _ in chunks]
        list(self._workers().map(run, chunks, times))
        for name in timings:
            timings[name] += sum(tm[name] for tm in times)

    def close(self) -> None:
        self._list_search.clear()   # their block tables point into the reader's blocks
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

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
                timings["ann_ms"] += elapsed_ms(t)
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
        timings["rescore_ms"] += elapsed_ms(t)
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
        timings["rescore_ms"] += elapsed_ms(t)
        return keys

    def _fetch(self, modality, ids: np.ndarray, timings):
        """(μ [U, D], log_var [U, D], rows: ids' positions in them) for the U distinct ids,
        read in one store transaction."""
        t = time.perf_counter()
        uniq, inverse = np.unique(ids, return_inverse=True)
        mu, lv = self.reader.fetch(modality, uniq)
        timings["fetch_ms"] += elapsed_ms(t)
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

