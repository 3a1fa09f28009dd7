"""Which inverted lists each query of a batch probes (engine/list_search.py reads their blocks).

faiss 1.15.1 sends a search of 64 queries against 1,024 centroids to a per-query scan
(0.7–1.7 ms here); one BLAS product with the centroids and a compiled top-n per query take
0.3–0.4 ms. faiss' threshold between the two is global and also decides single queries, where
its scan is the faster (0.03 ms), so a batch chooses here instead of changing it.
"""
from __future__ import annotations

import numpy as np

from engine import kernels

BLAS_PROBE_MIN = 8   # queries from which one product with every centroid beats faiss' scan


def probe_lists(blocks, mu_q: np.ndarray) -> np.ndarray:
    """[Q, nprobe] lists of each query, nearest first: a batch from one BLAS product with the
    centroids (indexer/lists.py: centroid_keys) and a compiled top-n per query; fewer queries
    (single searches: 0.03 ms) through the quantizer's own search."""
    keys = blocks.centroid_keys(mu_q) if len(mu_q) >= BLAS_PROBE_MIN else None
    if keys is None:
        return blocks.probe(mu_q)
    out = np.empty((len(mu_q), min(blocks.nprobe, keys.shape[1])), np.int64)
    kernels.top_columns(keys, out.shape[1], out)
    return out
