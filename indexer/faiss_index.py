"""FAISS on μ: choose a factory from N, build/train it, and pick nprobe by measured recall.

μ is L2-normalised, so every index uses METRIC_INNER_PRODUCT and inner product = cosine.
FAISS ids are the global shard ids: IVF indexes take them with add_with_ids; indexes without
id support (Flat, HNSW, …) number rows 0..n-1 in add order, which equals the global ids
because shards are read in id order (checked on every add).
"""

from __future__ import annotations

import logging
import math
import threading

import faiss
import numpy as np

from core.errors import PcmeError

logger = logging.getLogger(__name__)

FLAT_MAX = 5_000          # below this brute force is fast and exact
SQ8_MIN = 2_000_000       # from here 4 bytes/dim of IVF,Flat lists get costly; SQ8 is 1 byte
HNSW_MIN = 4_000_000      # from here centroids are searched with HNSW, not brute force
FLAT_QUANTIZER_MAX_K = 1024  # brute-force assignment costs n·K·D: K = 4096 at 1M took minutes
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
MAX_TRAIN = 200_000
# k-means costs n_train·K·D·niter: with K ≈ √n and 64 points per list it stays ~n·D·niter/16
# (seconds at 1M×256 on 2 cores; 256 points per list and K = 4096 took minutes). Measured
# recall of the μ ranking hardly moves, and nprobe is tuned on held-out queries anyway.
TRAIN_PER_LIST = 64
KMEANS_ITERS = 20
GPU_MAX_K = 2048          # the largest k (and nprobe) faiss' GPU k-selection kernels take


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, whatever the machine has."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def choose_factory(n: int, dim: int) -> str:
    """Flat when n <= 5,000; else IVF with K ≈ 4·sqrt(n) lists (a power of two, at least 39
    training points per list); SQ8 codes from 2M vectors on (μ then goes to the store).
    Below 4M the centroids are searched by brute force, so K is capped at 1,024 to keep the
    build (k-means, then assigning every vector) within budget on a 2-core machine; from 4M
    an HNSW32 coarse quantizer makes assignment cheap and K is not capped."""
    if n < 1 or dim < 1:
        raise ValueError(f"choose_factory: need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    if n <= FLAT_MAX:
        return "Flat"
    k = 2 ** round(math.log2(4 * math.sqrt(n)))
    k = min(k, 2 ** int(math.log2(n // MIN_POINTS_PER_LIST)))
    quantizer = "_HNSW32" if n >= HNSW_MIN else ""
    if not quantizer:
        k = min(k, FLAT_QUANTIZER_MAX_K)
    return f"IVF{k}{quantizer},{'SQ8' if n >= SQ8_MIN else 'Flat'}"


def make_index(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1][:200]
        raise PcmeError(f"--factory {factory!r}: faiss cannot build it ({msg})") from None


def ivf_of(index: faiss.Index):
    """The IVF layer of an index (through pre-transforms), or None for non-IVF indexes."""
    return faiss.try_extract_index_ivf(index)


def train_size(index: faiss.Index, n: int) -> int:
    """Rows to sample: ≤ 256·K for IVF, ≤ 200k for other trained codecs (PQ, SQ…), and a
    few hundred for untrained ones (used only to probe reconstruction)."""
    ivf = ivf_of(index)
    if ivf is not None:
        return min(n, TRAIN_PER_LIST * ivf.nlist, MAX_TRAIN)
    return min(n, 256 if index.is_trained else MAX_TRAIN)


def kmeans_index(dim: int, metric: int) -> faiss.Index | None:
    """Where IVF k-means runs its assignment step: a flat index on all GPUs when faiss sees
    any (the expensive n·K·D part), else None (FAISS' own CPU path)."""
    if not gpu_count():
        return None
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlat(dim, metric))


def train(index: faiss.Index, sample: np.ndarray, factory: str,
          clustering: faiss.Index | None = None) -> None:
    """Train `index` on `sample`. IVF k-means assigns with `clustering` when given (default:
    kmeans_index, i.e. the GPUs when there are any); the centroids end up in the quantizer
    either way, so the written index is the same kind of file."""
    if index.is_trained:
        return
    ivf = ivf_of(index)
    if ivf is not None and len(sample) < ivf.nlist:
        raise PcmeError(f"--factory {factory!r}: {ivf.nlist} lists need at least that many "
                        f"vectors to train, only {len(sample)} available")
    if ivf is not None:  # the sample is already ≤ TRAIN_PER_LIST·K: no FAISS resampling
        ivf.cp.niter = KMEANS_ITERS
        ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
        clustering = clustering if clustering is not None else kmeans_index(index.d,
                                                                            ivf.metric_type)
        ivf.clustering_index = clustering
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    finally:
        if ivf is not None:
            ivf.clustering_index = None  # never written; drop the reference to GPU memory


def add(index: faiss.Index, mu: np.ndarray, ids: np.ndarray) -> None:
    mu = np.ascontiguousarray(mu, dtype=np.float32)
    if ivf_of(index) is not None:
        index.add_with_ids(mu, np.ascontiguousarray(ids, dtype=np.int64))
        return
    if len(ids) and not np.array_equal(ids, np.arange(index.ntotal, index.ntotal + len(ids))):
        raise ValueError(f"add: index without id support needs ids in order from {index.ntotal}")
    index.add(mu)


class GpuSearch:
    """A copy of one CPU index on all GPUs faiss sees, serving `search` with k ≤ GPU_MAX_K.
    nprobe is index state on the GPU (set through GpuParameterSpace), hence the lock."""

    def __init__(self, index: faiss.Index):
        self.index = faiss.index_cpu_to_all_gpus(index)
        self.ivf = ivf_of(index) is not None
        self._nprobe, self._lock = None, threading.Lock()

    @classmethod
    def create(cls, index: faiss.Index) -> "GpuSearch | None":
        if not gpu_count():
            return None
        try:
            return cls(index)
        except (RuntimeError, AttributeError) as e:  # e.g. an HNSW quantizer has no GPU twin
            logger.warning("μ index stays on the CPU: faiss cannot copy it to the GPU (%s)",
                           str(e).strip().splitlines()[-1][:200])
            return None

    def can_search(self, k: int, nprobe: int | None) -> bool:
        return k <= GPU_MAX_K and (nprobe or 0) <= GPU_MAX_K

    def search(self, queries: np.ndarray, k: int, nprobe: int | None):
        with self._lock:
            if self.ivf and nprobe and nprobe != self._nprobe:
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", int(nprobe))
                self._nprobe = nprobe
            return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None):
    """Top-k inner products; nprobe is passed per call (no shared state is mutated)."""
    params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe and ivf_of(index) else None
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)


def range_search(index: faiss.Index, query: np.ndarray, threshold: float,
                 nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every vector with inner product > threshold for ONE query [D]: (ids, ip), best first."""
    params = faiss.SearchParametersIVF(nprobe=int(nprobe)) if nprobe and ivf_of(index) else None
    lims, ip, ids = index.range_search(np.ascontiguousarray(query[None], dtype=np.float32),
                                       float(threshold), params=params)
    order = np.argsort(-ip[lims[0]:lims[1]], kind="stable")
    return ids[order].astype(np.int64), ip[order]


def nprobe_ladder(nlist: int) -> list[int]:
    """1, 2, 4, … up to nlist, always ending at nlist (where IVF search becomes exact)."""
    ladder = [2 ** i for i in range(int(math.log2(nlist)) + 1)]
    return ladder if ladder[-1] == nlist else ladder + [nlist]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k ids found in its approximate top-k."""
    if found.shape != truth.shape:
        raise ValueError(f"recall_at_k: shapes {found.shape} and {truth.shape} differ")
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def choose_nprobe(index: faiss.Index, queries: np.ndarray, truth: np.ndarray,
                  target: float = 0.95) -> tuple[int, float]:
    """Smallest nprobe on the ladder whose recall@k (k = truth.shape[1]) against the exact
    top-k reaches `target`; if none does (lossy codes), the best one, with a warning."""
    nlist = ivf_of(index).nlist
    best = (nlist, -1.0)
    for nprobe in nprobe_ladder(nlist):
        _, found = search(index, queries, truth.shape[1], nprobe)
        r = recall_at_k(found, truth)
        logger.info("nprobe %d: recall@%d %.3f", nprobe, truth.shape[1], r)
        if r >= target:
            return nprobe, r
        if r > best[1]:
            best = (nprobe, r)
    logger.warning("no nprobe reaches recall %.2f (best %.3f at nprobe %d)", target, best[1], best[0])
    return best


class ExactTopK:
    """Running exact top-k by inner product for a few queries, fed one batch at a time,
    so the recall reference never needs all of μ in memory."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = np.ascontiguousarray(queries, dtype=np.float32), k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def update(self, mu: np.ndarray, ids: np.ndarray) -> None:
        # faiss.knn keeps a k-heap per query while it scans: far cheaper than partitioning
        # the full [Q, batch] score matrix; the small [Q, 2k] merge is then done in numpy.
        k = min(self.k, len(ids))
        batch_scores, rows = faiss.knn(self.queries, np.ascontiguousarray(mu, dtype=np.float32),
                                       k, metric=faiss.METRIC_INNER_PRODUCT)
        self.merge(batch_scores, np.asarray(ids)[rows])

    def merge(self, batch_scores: np.ndarray, batch_ids: np.ndarray) -> None:
        """Fold in candidates [Q, k'] found elsewhere (another batch, or a distributed part)."""
        scores = np.concatenate([self.scores, batch_scores], axis=1)
        cand = np.concatenate([self.ids, batch_ids], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            scores = np.take_along_axis(scores, keep, 1)
            cand = np.take_along_axis(cand, keep, 1)
        self.scores, self.ids = scores, cand
