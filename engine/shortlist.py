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

from indexer.variance import VarianceBounds, margin, unseen_best

logger = logging.getLogger(__name__)

BOUNDED = ("mu", "csd", "w2", "elk", "bhattacharyya")


def shortlist_size(k: int, n: int, score: str = "mc") -> int:
    """First ANN shortlist. Bounded scores start at 5·k (the bound then adds what is
    missing with one range search); the fixed shortlist of mc is 10·k, at least 200.
    Never more than the index holds."""
    return min(n, 5 * k if score in BOUNDED else max(10 * k, 200))


def kth_key(keys: np.ndarray, k: int) -> float:
    return float(np.partition(keys, len(keys) - k)[len(keys) - k])


def is_final(score: str, keys: np.ndarray, k: int, ip_max: float, mu_q: np.ndarray,
             lv_q: np.ndarray, bounds: VarianceBounds | None) -> bool:
    """True when no item with inner product ≤ ip_max can enter the top-k of `keys`."""
    if score not in BOUNDED or bounds is None:
        return True  # mc, or an index built without variance stats: fixed shortlist
    if len(keys) < k:
        return False
    return unseen_best(score, ip_max, mu_q, lv_q, bounds) < margin(kth_key(keys, k))
