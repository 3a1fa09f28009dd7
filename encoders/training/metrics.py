"""Retrieval metrics from a score matrix (higher = better) and a boolean ground truth.

Inputs are numpy arrays: `scores` [n_queries, n_items] and `gt` [n_queries, n_items] bool, where
gt[q, i] says item i is a true match of query q (many-to-many allowed). R is a query's number
of true items; queries with R = 0 have nothing to find and are skipped by every metric.

Tie rule (deterministic, everywhere): items are ranked by descending score, and items with
equal scores keep their index order (a stable sort of −score). Ties therefore never help or hurt
by chance, and a chunked computation gives exactly the unchunked result.

Everything runs over chunks of queries, so a 25,000 × 5,000 matrix is never copied or sorted
whole: the largest temporaries are `chunk × n_items`. Recall needs no sort at all (the rank of
the best true item is a count); R-precision and MAP@R partition each row and sort only its top
max(R) items.
"""
from __future__ import annotations

import logging

import numpy as np

from core.errors import PcmeError

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 4_000_000  # default chunk: about this many score entries handled at once


# ---------------------------------------------------------------------------- checks & chunks

def _check(scores, gt) -> tuple[np.ndarray, np.ndarray]:
    scores, gt = np.asarray(scores), np.asarray(gt)  # no copy for numpy input
    if scores.ndim != 2 or 0 in scores.shape:
        raise PcmeError(f"metrics: scores must be a non-empty [n_queries, n_items] matrix, "
                        f"got shape {scores.shape}")
    if gt.shape != scores.shape:
        raise PcmeError(f"metrics: gt shape {gt.shape} != scores shape {scores.shape}")
    if gt.dtype != np.bool_:
        raise PcmeError(f"metrics: gt must be a boolean matrix, got dtype {gt.dtype}")
    return scores, gt


def _chunks(n_queries: int, n_items: int, chunk: int | None):
    """Yield slices of query rows; `chunk` rows each, or sized from _CHUNK_ELEMENTS."""
    if chunk is not None and chunk < 1:
        raise PcmeError(f"metrics: chunk must be >= 1, got {chunk}")
    step = chunk or max(1, _CHUNK_ELEMENTS // max(1, n_items))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def _rows(scores, rows: slice) -> np.ndarray:
    block = np.ascontiguousarray(scores[rows])
    if np.isnan(block).any():
        raise PcmeError(f"metrics: scores contain NaN (query rows {rows.start}..{rows.stop - 1})")
    return block


# ---------------------------------------------------------------------------- per-query values

def _top_order(block: np.ndarray, top: int) -> np.ndarray:
    """[rows, top] item indices of each row's best `top` items, best first, by the tie rule.

    argpartition finds each row's top-th best score t in O(n_items); items above t are all
    in, and the remaining places go to items equal to t in index order (argpartition alone
    would pick among ties arbitrarily). Only those `top` items are then sorted.
    """
    kth = -np.partition(-block, top - 1, axis=1)[:, top - 1:top]
    above = block > kth
    tied = block == kth
    free = top - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= free))
    idx = np.nonzero(chosen)[1].reshape(len(block), top)   # exactly `top` per row, by index
    order = np.argsort(-np.take_along_axis(block, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)          # stable: ties keep index order


def _first_hit_rank(block: np.ndarray, gt_block: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best true item (rows need R ≥ 1); O(n_items), no sort.

    The best true item is the true item with the highest score, lowest index among ties; its
    rank is the number of items that come before it under the tie rule.
    """
    n_items = block.shape[1]
    best = np.where(gt_block, block, -np.inf).max(axis=1, keepdims=True)
    first = np.argmax(gt_block & (block == best), axis=1)[:, None]
    before_tied = (block == best) & (np.arange(n_items)[None, :] < first)
    return (block > best).sum(axis=1) + before_tied.sum(axis=1)


def _precision_terms(top: np.ndarray, gt_block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (R-precision, AP@R), from `top` = the rows' best items in rank order (at least
    max(R) columns, see _top_order); rows need R ≥ 1."""
    n_true = gt_block.sum(axis=1)
    top = top[:, :n_true.max()]
    rel = np.take_along_axis(gt_block, top, axis=1)       # rel[q, i]: is the rank-i item true
    ranks = np.arange(1, top.shape[1] + 1)[None, :]
    counted = rel & (ranks <= n_true[:, None])
    hits = np.cumsum(rel, axis=1)                         # true items within the top i
    r_prec = counted.sum(axis=1) / n_true
    ap = np.where(counted, hits / ranks, 0.0).sum(axis=1) / n_true
    return r_prec, ap


def _per_query(scores, gt, chunk, ranked: bool = True) -> dict:
    """Per-query values (R = 0 queries dropped) plus the skip count. `ranked=False` skips the
    sort and gives only the first-hit ranks (all that recall needs)."""
    scores, gt = _check(scores, gt)
    parts = {"first": [], "r_prec": [], "ap": []}
    n_skipped = 0
    for rows in _chunks(*scores.shape, chunk):
        block, gt_block = _rows(scores, rows), np.asarray(gt[rows])
        keep = gt_block.any(axis=1)
        n_skipped += int((~keep).sum())
        block, gt_block = block[keep], gt_block[keep]
        parts["first"].append(_first_hit_rank(block, gt_block))
        if ranked and len(block):
            top = _top_order(block, int(gt_block.sum(axis=1).max()))
            r_prec, ap = _precision_terms(top, gt_block)
            parts["r_prec"].append(r_prec)
            parts["ap"].append(ap)
    out = {key: np.concatenate(val) if val else np.zeros(0) for key, val in parts.items()}
    if out["first"].size == 0:
        raise PcmeError("metrics: no query has a true item (every row of gt is empty)")
    out["n_skipped"] = n_skipped
    return out


# ---------------------------------------------------------------------------- public metrics

def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise PcmeError(f"metrics: ks must be positive integers, got {ks}")
    return ks


def recall_at_k(scores, gt, ks=(1, 5, 10), chunk: int | None = None) -> dict[int, float]:
    """{k: fraction of queries (R ≥ 1) with at least one true item in the top k}."""
    ks = _check_ks(ks)
    first = _per_query(scores, gt, chunk, ranked=False)["first"]
    return {k: float((first < k).mean()) for k in ks}


def r_precision(scores, gt, chunk: int | None = None) -> float:
    """Mean over queries of precision in the top R (R = the query's number of true items)."""
    return float(_per_query(scores, gt, chunk)["r_prec"].mean())


def map_at_r(scores, gt, chunk: int | None = None) -> float:
    """Mean over queries of (1/R)·Σ_{i≤R} P@i·rel(i) (MAP@R, Musgrave et al. 2020)."""
    return float(_per_query(scores, gt, chunk)["ap"].mean())


def _hamming_gt(mh_q: np.ndarray, mh_d: np.ndarray, zeta: int) -> np.ndarray:
    """Plausible matches: Hamming distance between 0/1 label vectors ≤ ζ, via a float matmul
    (exact for counts this small, and BLAS-fast where an integer matmul is not)."""
    both = mh_q @ mh_d.T
    hamming = mh_q.sum(axis=1)[:, None] + mh_d.sum(axis=1)[None, :] - 2.0 * both
    return hamming <= zeta + 0.5


def _check_multi_hot(scores, mh_q, mh_d) -> None:
    if mh_q.ndim != 2 or mh_d.ndim != 2 or mh_q.shape[1] != mh_d.shape[1]:
        raise PcmeError(f"pmrp_coco: multi-hot shapes {mh_q.shape} and {mh_d.shape} differ")
    if scores.ndim != 2 or scores.shape != (mh_q.shape[0], mh_d.shape[0]):
        raise PcmeError(f"pmrp_coco: scores shape {scores.shape} != (query rows, item rows) = "
                        f"{(mh_q.shape[0], mh_d.shape[0])}")


def pmrp_coco(scores, multi_hot_q, multi_hot_d, zetas=(0, 1, 2),
              chunk: int | None = None) -> float:
    """Plausible-match R-precision (PCME): R-precision where a query's true items are those
    whose multi-hot category vector is within Hamming distance ζ, averaged over ζ in `zetas`.
    Queries without any plausible match at a given ζ are skipped for that ζ."""
    scores = np.asarray(scores)
    mh_q = np.asarray(multi_hot_q, dtype=np.float32)
    mh_d = np.asarray(multi_hot_d, dtype=np.float32)
    _check_multi_hot(scores, mh_q, mh_d)
    r_prec = {zeta: [] for zeta in zetas}
    for rows in _chunks(*scores.shape, chunk):
        block = _rows(scores, rows)
        gts = {zeta: _hamming_gt(mh_q[rows], mh_d, zeta) for zeta in zetas}
        most = max(int(gt.sum(axis=1).max()) for gt in gts.values())
        if most == 0:
            continue
        top = _top_order(block, most)                     # one ranking serves every ζ
        for zeta, gt_block in gts.items():
            keep = gt_block.any(axis=1)
            if keep.any():
                r_prec[zeta].append(_precision_terms(top[keep], gt_block[keep])[0])
    if any(not parts for parts in r_prec.values()):
        raise PcmeError("pmrp_coco: no query has a plausible match at some ζ")
    return float(np.mean([np.concatenate(parts).mean() for parts in r_prec.values()]))


def _direction(scores, gt, chunk) -> dict:
    values = _per_query(scores, gt, chunk)
    out = {f"R@{k}": float((values["first"] < k).mean()) for k in (1, 5, 10)}
    out["PMRP"] = float(values["r_prec"].mean())
    out["mAP@R"] = float(values["ap"].mean())
    if values["n_skipped"]:
        out["n_skipped"] = values["n_skipped"]
    return out


def retrieval_report(score_t2i, gt, chunk: int | None = None, score_i2t=None) -> dict:
    """Both directions from one [n_captions, n_images] matrix (or image→text from score_i2t,
    same shape, when the captions scored as items differ from the captions as queries):
    {"t2i": {...}, "i2t": {...}, "rsum"}; each direction has R@1, R@5, R@10, PMRP
    (R-precision), mAP@R and, when some queries had no true item, n_skipped. rsum is the sum of
    the six R@K, times 100."""
    score_t2i, gt = _check(score_t2i, gt)
    score_i2t = score_t2i if score_i2t is None else _check(score_i2t, gt)[0]
    report = {"t2i": _direction(score_t2i, gt, chunk), "i2t": _direction(score_i2t.T, gt.T, chunk)}
    report["rsum"] = 100.0 * sum(report[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))
    return report
