"""The served match probability: PCME's Monte-Carlo p(match) under fixed noise, in numpy.

core/montecarlo.py holds the training side (the loss's sample-pair logits and the contract
score `match_prob`, in torch, with fresh noise). Serving and eval use fixed noise instead
(`item_noise`): an item's samples depend only on its id, so its score does not depend on which
other items share a call, and eval's mc equals query's mc. `fixed_match_prob` computes that
served score (eval, exact search, rescoring, every hit's p_match): the same sums as
core.montecarlo.match_prob_block with item_noise (tests/test_noise_rows.py), laid out for speed.

This module imports no torch: a one-shot text query (numpy text tower, FAISS, LMDB, these
sums) never loads it, and `import torch` alone costs 1.7-4 s on a small machine.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from core.constants import DIST_EPS, MC_SAMPLES, MC_SEED, NOISE_ROWS  # noqa: F401 (re-exported)
from core.process import default_threads

FIXED_BLOCK_FLOATS = 1 << 19   # sample-pair distances per block of fixed_match_prob: 2 MiB
LOOP_MAX_QUERY_SAMPLES = 32   # fixed_match_prob takes the compiled loop up to this Q·J
LOOP_MIN_ITEMS = 64            # and from this many items (see fixed_match_prob)
PARALLEL_MIN_BLOCKS = 4        # product blocks from which fixed_match_prob runs them on threads


@lru_cache(maxsize=4)
def _noise_table(n_samples: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """([NOISE_ROWS + 1, J, D] fixed standard-normal noise, which rows are drawn yet); row
    NOISE_ROWS is the query's. Rows are drawn on first use, each from its own stream: a
    one-shot query needs the rows of its ten hits, and drawing the whole table (16.8M
    normals at D = 256) cost more than the search."""
    return (np.empty((NOISE_ROWS + 1, n_samples, dim), np.float32),
            np.zeros(NOISE_ROWS + 1, bool))


def noise_rows(rows: np.ndarray, n_samples: int, dim: int) -> np.ndarray:
    """Rows `rows` (any shape S) of the fixed noise table: [*S, J, D]. Row r is the float32
    standard normal stream of numpy's PCG64 seeded with (MC_SEED, r), whichever rows were
    drawn before it."""
    rows = np.asarray(rows, np.int64)
    return _draw(rows, n_samples, dim)[rows]


def _draw(rows: np.ndarray, n_samples: int, dim: int) -> np.ndarray:
    """Draw the rows of the table not drawn yet; returns the table."""
    table, drawn = _noise_table(n_samples, dim)
    for r in np.unique(rows[~drawn[rows]]):
        gen = np.random.Generator(np.random.PCG64((MC_SEED, int(r))))
        table[r] = gen.standard_normal((n_samples, dim), dtype=np.float32)
        drawn[r] = True   # after the row is written: a concurrent reader never sees it early
    return table


def draw_all_noise(n_samples: int, dim: int) -> None:
    """Draw every row of the fixed noise now (~0.1 s at J = 16, D = 256 on an idle core):
    what a long-running server does at start-up, so no query pays ~20 µs per hit whose row
    is new."""
    _draw(np.arange(NOISE_ROWS + 1), n_samples, dim)


def item_noise(ids: np.ndarray, n_samples: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed noise keyed by item id. For ids of shape S returns (eps_q [J, 1…, D] broadcastable
    to S, eps_d [J, *S, D]); every query uses the same row."""
    ids = np.asarray(ids, dtype=np.int64)
    eps_d = np.moveaxis(noise_rows(ids % NOISE_ROWS, n_samples, dim), -2, 0)   # (J, *S, D)
    eps_q = noise_rows(np.asarray([NOISE_ROWS]), n_samples, dim)[0]
    return eps_q.reshape(n_samples, *([1] * ids.ndim), dim), eps_d


def fixed_match_prob(mu_q, lv_q, mu_d, lv_d, item_ids, a, b, n_samples: int = MC_SAMPLES
                     ) -> np.ndarray:
    """[Q, M] match probability under the fixed serving noise: queries [Q, D] against items
    [M, D] (numpy arrays; the items' dtype is the output's) whose ids are `item_ids` [M].
    What eval reports and the engine serves as mc.

    In blocks of FIXED_BLOCK_FLOATS sample-pair distances, two ways. One query against many
    items (Q·J up to LOOP_MAX_QUERY_SAMPLES, at least LOOP_MIN_ITEMS items: an mc shortlist)
    takes the compiled loop of core/mc_kernel.py, which makes each item's samples in cache
    (200 items: 0.9 against 2.0 ms). Otherwise the items' samples are made as one array and
    one matrix product per block takes them: BLAS runs it on every core, which wins for many
    query samples (eval's blocks of queries, exact search of a batch), and a few items (the
    p_match of a query's hits) do not pay numba's start-up (0.2–0.45 s) in a process that has
    not run a compiled loop yet, such as a one-shot query on a small index."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    (n_q, dim), n_d, dtype = mu_q.shape, len(item_ids), mu_d.dtype
    rows = item_ids % NOISE_ROWS
    table = _draw(np.append(rows, NOISE_ROWS), n_samples, dim)
    eps_q = table[NOISE_ROWS].astype(dtype, copy=False)
    z_q = (mu_q[:, None] + np.exp(0.5 * lv_q)[:, None] * eps_q).astype(dtype, copy=False)
    z_q = np.ascontiguousarray(z_q.reshape(-1, dim))                       # [Q·J, D]
    sq_q = np.einsum("ij,ij->i", z_q, z_q)
    mu_d = np.ascontiguousarray(mu_d)
    scale_d = np.exp(0.5 * lv_d).astype(dtype, copy=False)
    loop = len(z_q) <= LOOP_MAX_QUERY_SAMPLES and n_d >= LOOP_MIN_ITEMS
    dists = (_LoopDists if loop else _ProductDists)(z_q, mu_d, scale_d, rows, table)
    width = len(z_q) if loop else max(len(z_q), dim)   # the product path also holds samples
    step = max(1, min(n_d, FIXED_BLOCK_FLOATS // (n_samples * width)))   # items per block
    out = np.empty((n_q, n_d), dtype)

    def block(s: int) -> None:              # writes its own columns of out
        m = min(step, n_d - s)
        sq = dists.block(s, m, step)        # [m, J, Q·J] (loop) or [m·J, Q·J] (product)
        sq += sq_q
        p = _match_logistic(sq, a, b).reshape(m, n_samples, n_q, n_samples)
        # the mean over both sample axes: einsum's sum took half the time of .mean(axis=(1, 3))
        out[:, s:s + m] = np.einsum("ikqj->qi", p) / n_samples ** 2

    starts = range(0, n_d, step)
    if loop or len(starts) < PARALLEL_MIN_BLOCKS:
        for s in starts:
            block(s)
    else:   # numpy's products and ufuncs release the GIL: one block per core at a time
        list(_pool().map(block, starts))
    return out


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(default_threads(), thread_name_prefix="served-mc")


def _match_logistic(sq: np.ndarray, a: float, b: float) -> np.ndarray:
    """sigmoid(−a·√(max(sq, 0) + DIST_EPS) + b) in place over squared sample distances: the
    same logistic as core.montecarlo._logit, without a temporary per step."""
    np.maximum(sq, 0.0, out=sq)
    sq += DIST_EPS
    np.sqrt(sq, out=sq)
    sq *= a
    sq -= b                       # −logit
    with np.errstate(over="ignore"):
        np.exp(sq, out=sq)        # inf for a far pair: its probability is 1/inf = 0
    sq += 1.0
    return np.reciprocal(sq, out=sq)


class _LoopDists:
    """Distance blocks from the compiled loop: ‖z_d‖² − 2⟨z_q, z_d⟩ as [m, J, Q·J]."""

    def __init__(self, z_q, mu_d, scale_d, rows, table):
        self.z_q, self.mu_d, self.scale_d = z_q, mu_d, np.ascontiguousarray(scale_d)
        self.rows, self.table, self.buf = rows, table, None

    def block(self, s: int, m: int, step: int) -> np.ndarray:
        from core.mc_kernel import sample_sq_dists   # here: numba loads only if the loop runs

        if self.buf is None:
            self.buf = np.empty((step, self.table.shape[1], len(self.z_q)), self.mu_d.dtype)
        sample_sq_dists(self.z_q, self.mu_d[s:s + m], self.scale_d[s:s + m], self.rows[s:s + m],
                        self.table, self.buf[:m])
        return self.buf[:m]


class _ProductDists:
    """Distance blocks from one matrix product: ‖z_d‖² − 2⟨z_d, z_q⟩ as [m·J, Q·J]. The items'
    noise rows are gathered item-major and sampled into per-thread buffers kept between
    calls, so the temporaries stay in cache instead of faulting in fresh pages on every
    step."""

    def __init__(self, z_q, mu_d, scale_d, rows, table):
        self.z_q, self.mu_d, self.scale_d, self.rows, self.table = z_q, mu_d, scale_d, rows, table

    def block(self, s: int, m: int, step: int) -> np.ndarray:
        (n_zq, dim), n_samples, dtype = self.z_q.shape, self.table.shape[1], self.mu_d.dtype
        z = _buffer("z_d", (step, n_samples, dim), dtype)[:m]
        sq = _buffer("sq", (step * n_samples, n_zq), dtype)[:m * n_samples]
        if dtype == self.table.dtype:     # the noise rows straight into the kept buffer
            np.take(self.table, self.rows[s:s + m], axis=0, out=z)
        else:
            z[...] = self.table[self.rows[s:s + m]]
        z *= self.scale_d[s:s + m, None]
        z += self.mu_d[s:s + m, None]
        z = z.reshape(-1, dim)                                          # [m·J, D]
        np.matmul(z, self.z_q.T, out=sq)
        sq *= -2.0
        sq += np.einsum("ij,ij->i", z, z)[:, None]
        return sq


_buffers = threading.local()   # per thread: calls on several threads never share a buffer


def _buffer(name: str, shape: tuple, dtype) -> np.ndarray:
    """A scratch array of at least `shape` kept between calls of this thread: a new 2 MiB
    buffer per call comes from fresh pages (mmap), and faulting them in cost as much as the
    math (the same call took 2.2 or 5.3 ms depending on the allocator's state). Below
    FIXED_BLOCK_FLOATS / 2 a fresh array is cheaper (malloc reuses small chunks)."""
    size = int(np.prod(shape))
    if size < FIXED_BLOCK_FLOATS // 2:
        return np.empty(shape, dtype)
    key = (name, np.dtype(dtype))
    store = getattr(_buffers, "store", None)
    if store is None:
        store = _buffers.store = {}
    if key not in store or store[key].size < size:
        store[key] = np.empty(size, dtype)
    return store[key][:size].reshape(shape)
