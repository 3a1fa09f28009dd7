"""Does σ mean anything? Uncertainty analysis of a retrieval run (pure numpy, no I/O).

Two checks from the PCME paper:
- queries sorted into bins by their total variance Σσ², with R@1 per bin: if σ captures
  ambiguity, R@1 should fall as uncertainty rises;
- Spearman rank correlation between a caption's Σσ² and how many images it truly matches:
  the paper's reading is that generic captions ("a street scene"), which match many images,
  should be the uncertain ones. Measured on the scenes, the sign depends on the training
  positives (see README, "What σ learns"), so the report gives the number, not a verdict.
Datasets that label their captions (the scenes' levels of specificity) also get a per-level
table: how many images a caption of that level matches, its mean Σσ², and its R@1.
"""
from __future__ import annotations

import numpy as np

from core.errors import PcmeError


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span (as Spearman requires)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of the 1-based ranks s+1..e
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise PcmeError(f"spearman: need two 1-D arrays of equal length >= 2, got {x.shape}, {y.shape}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def recall_by_uncertainty(total_var: np.ndarray, hit_at_1: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Queries in `n_bins` equal-count bins by total variance (low to high), R@1 in each."""
    total_var, hit_at_1 = np.asarray(total_var), np.asarray(hit_at_1, dtype=bool)
    if total_var.shape != hit_at_1.shape or total_var.ndim != 1:
        raise PcmeError(f"recall_by_uncertainty: shapes {total_var.shape} and {hit_at_1.shape} differ")
    if n_bins < 1 or len(total_var) < n_bins:
        raise PcmeError(f"recall_by_uncertainty: {len(total_var)} queries cannot fill {n_bins} bins")
    order = np.argsort(total_var, kind="stable")
    bins = []
    for b, idx in enumerate(np.array_split(order, n_bins)):
        bins.append({"bin": b, "var_lo": float(total_var[idx].min()),
                     "var_hi": float(total_var[idx].max()),
                     "var_mean": float(total_var[idx].mean()), "n": int(len(idx)),
                     "R@1": float(hit_at_1[idx].mean())})
    return bins


def top1_hits(scores: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """bool [Q]: is the best-scored item (lowest index among ties) a true match?"""
    if scores.shape != gt.shape:
        raise PcmeError(f"top1_hits: scores {scores.shape} and gt {gt.shape} differ")
    best = np.argmax(scores, axis=1)
    return gt[np.arange(len(best)), best]


def by_group(groups, total_var: np.ndarray, matches: np.ndarray, hits: np.ndarray) -> list[dict]:
    """Per caption group (in order of first appearance): n, mean true matches, mean Σσ², R@1."""
    groups = np.asarray(groups)
    if groups.shape != total_var.shape:
        raise PcmeError(f"by_group: {groups.shape[0]} group labels for {len(total_var)} captions")
    out = []
    for g in dict.fromkeys(groups.tolist()):
        k = groups == g
        out.append({"group": g, "n": int(k.sum()), "mean_matches": float(matches[k].mean()),
                    "mean_var": float(total_var[k].mean()), "R@1": float(hits[k].mean())})
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for telling `positive` items from the rest: the
    probability that a random positive scores above a random negative, ties counting ½
    (Mann-Whitney U from average ranks). NaN when either class is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise PcmeError(f"auroc: shapes {scores.shape} and {positive.shape} differ")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


COVERAGES = tuple(round(1.0 - 0.1 * k, 1) for k in range(10))   # 1.0, 0.9, ..., 0.1


def risk_coverage(total_var: np.ndarray, hits: np.ndarray, coverages=COVERAGES) -> list[dict]:
    """R@1 over the fraction c of queries with the lowest Σσ² (the ones a user would keep if
    the most uncertain were set aside), for each c: [{"coverage", "R@1", "n"}]."""
    order = np.argsort(np.asarray(total_var), kind="stable")
    hits = np.asarray(hits, bool)
    out = []
    for c in coverages:
        n = max(1, int(round(c * len(order))))
        out.append({"coverage": c, "R@1": float(hits[order[:n]].mean()), "n": n})
    return out


def uncertainty_report(query_log_var: np.ndarray, scores: np.ndarray, gt: np.ndarray,
                       n_bins: int = 10, groups=None, spearman_key: str =
                       "spearman_caption_var_vs_matches") -> dict:
    """How well the queries' Σσ² tells the user when to distrust a result. `scores` and `gt`
    are [queries, items] (text→image: caption queries; image→text: the transposes).
    {spearman_key, "bins", "auroc_failure", "risk_coverage"}, plus "by_group" when `groups`
    (one label per query) is given. auroc_failure: AUROC of Σσ² for predicting that the
    query's top-1 hit is wrong (1 = σ ranks every failure above every success)."""
    total_var = np.exp(query_log_var.astype(np.float64)).sum(axis=1)
    matches, hits = gt.sum(axis=1), top1_hits(scores, gt)
    report = {spearman_key: spearman(total_var, matches),
              "bins": recall_by_uncertainty(total_var, hits, min(n_bins, len(total_var))),
              "auroc_failure": auroc(total_var, ~hits),
              "risk_coverage": risk_coverage(total_var, hits)}
    if groups is not None:
        report["by_group"] = by_group(groups, total_var, matches, hits)
    return report
