"""Shortlists that provably hold the probabilistic top-k: grow until no unseen item can win.

The ANN stage ranks by ⟨μ_q, μ_d⟩ only. indexer/variance.py bounds, from the stored ranges of
the item variances, the best rank key any item below a given inner product could reach; the
engine fetches every item above the inner product at which that bound falls below the current
k-th best key (one FAISS range search), so for the closed-form scores the result equals
exhaustive search up to the ANN recall on μ. `mc` has no bound: a fixed shortlist.
"""
from __future__ import annotations

import logging

import numpy as np

from indexer.faiss_index import GPU_MAX_K

logger = logging.getLogger(__name__)

BOUNDED = ("mu", "csd", "w2", "elk", "bhattacharyya")
PREFETCH_PER_K = 200  # at 1M × 256 the bounded shortlists of elk run to ~1,000


def shortlist_size(k: int, n: int, score: str = "mc") -> int:
    """First ANN shortlist. Bounded scores start at 5·k (the bound then adds what is
    missing with one range search); the fixed shortlist of mc is 10·k, at least 200.
    Never more than the index holds."""
    return min(n, 5 * k if score in BOUNDED else max(10 * k, 200))


def prefetch_depth(k: int, n: int, first: int) -> int:
    """How many candidates the one ANN call returns for a bounded score: enough that the bound's
    threshold almost always falls inside the list (then no range search is needed), and no
    more than faiss' GPU kernels select. Asking FAISS for 200·k instead of 5·k costs little:
    the scan of the probed lists dominates, not the heap."""
    return min(n, max(first, min(PREFETCH_PER_K * k, GPU_MAX_K)))


def kth_key(keys: np.ndarray, k: int) -> float:
    return float(np.partition(keys, len(keys) - k)[len(keys) - k])
