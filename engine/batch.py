"""Search many queries at once: one ANN call, one σ fetch, one rescoring call for the batch,
then per-query shortlist growth where the bound says an unseen item could still win.

Stages are timed separately (ann, fetch, rescore) because they scale differently: ANN with
nprobe and N, fetch with the shortlist length (LMDB reads), rescore with shortlist × D.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from indexer import augmented as aug

from core.errors import PcmeError
from engine.exact import ExactSearcher
from core.montecarlo import MC_SAMPLES
from core.scores import score_name
from engine.rescore import rescore_gathered
from engine.shortlist import is_final, kth_key, shortlist_size
from indexer.variance import VarianceBounds, required_ip

logger = logging.getLogger(__name__)


@dataclass
class BatchResult:
    ids: np.ndarray                # [Q, k] best first
    keys: np.ndarray               # [Q, k] rank keys (higher is better; distances negated)
    shortlist: np.ndarray          # [Q] candidates rescored per query (N for exact search)
    timings_ms: dict               # per stage, summed over the batch


class BatchSearcher:
    """Shortlist search with the recall guarantee, exact search and augmented search for one
    index; `a`, `b` are the match-probability parameters of the `mc` score. `initial` sets
    the first shortlist's length; `guarantee=False` keeps it fixed (no bound, no growth):
    the calibrated mode, whose recall `bench --shortlist N` measures."""

    def __init__(self, reader, a: float, b: float, initial: int | None = None,
                 guarantee: bool = True, mc_samples: int = MC_SAMPLES):
        self.reader, self.a, self.b, self.initial = reader, a, b, initial
        self.mc_samples = mc_samples
        self.guarantee = guarantee
        self._exact: dict[str, ExactSearcher] = {}
        self._bound_cache: dict[str, VarianceBounds | None] = {}

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
        timings = {"ann_ms": 0.0, "fetch_ms": 0.0, "rescore_ms": 0.0}
        first = k if score == "mu" else max(k, self.initial or shortlist_size(k, n, score))
        t = time.perf_counter()
        ids, ip = self.reader.search(modality, mu_q, min(first, n))
        timings["ann_ms"] += _ms(t)
        if score == "mu":  # the ANN ranking is the answer: no σ needed
            return BatchResult(ids, ip, np.full(len(ids), ids.shape[1]), timings)
        mu_d, lv_d = self._fetch(modality, ids, timings)
        t = time.perf_counter()
        keys = rescore_gathered(score, mu_q, lv_q, mu_d, lv_d, ids, self.a, self.b,
                                self.mc_samples)
        timings["rescore_ms"] += _ms(t)
        bounds = self._bounds(modality) if self.guarantee else None
        out_ids, out_keys, sizes = [], [], []
        for i in range(len(mu_q)):
            c_ids, c_keys = self._grow(modality, mu_q[i], lv_q[i], k, score, n, ids[i], ip[i],
                                       keys[i], bounds, timings)
            top = np.argsort(-c_keys, kind="stable")[:k]
            out_ids.append(c_ids[top]), out_keys.append(c_keys[top]), sizes.append(len(c_ids))
        return BatchResult(np.stack(out_ids), np.stack(out_keys), np.asarray(sizes), timings)

    def _grow(self, modality, mu_q, lv_q, k, score, n, ids, ip, keys, bounds, timings):
        """Complete this query's shortlist so the bound proves its top-k final.

        The bounds are linear in ‖Δμ‖², so the k-th best key gives, in closed form, the inner
        product t below which no item can compete; one range search fetches every item above
        t. The k-th key can only improve with more candidates, so one round is enough.
        """
        if bounds is None or is_final(score, keys, k, float(ip[-1]), mu_q, lv_q, bounds):
            return ids, keys
        t = time.perf_counter()
        threshold = required_ip(score, kth_key(keys, k), mu_q, lv_q, bounds)
        more_ids, _ = self.reader.range_search(modality, mu_q, threshold)
        timings["ann_ms"] += _ms(t)
        new_ids = more_ids[~np.isin(more_ids, ids)]
        if not len(new_ids):
            return ids, keys
        mu_d, lv_d = self._fetch(modality, new_ids[None], timings)
        t = time.perf_counter()
        new_keys = rescore_gathered(score, mu_q[None], lv_q[None], mu_d, lv_d, new_ids[None],
                                    self.a, self.b, self.mc_samples)[0]
        timings["rescore_ms"] += _ms(t)
        return np.concatenate([ids, new_ids]), np.concatenate([keys, new_keys])

    def _fetch(self, modality, ids: np.ndarray, timings) -> tuple[np.ndarray, np.ndarray]:
        """[Q, M, D] μ and log_var for ids [Q, M]: the union is read in one store transaction."""
        t = time.perf_counter()
        uniq, inverse = np.unique(ids, return_inverse=True)
        mu, lv = self.reader.fetch(modality, uniq)
        timings["fetch_ms"] += _ms(t)
        inverse = inverse.reshape(ids.shape)
        return mu[inverse], lv[inverse]

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


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
