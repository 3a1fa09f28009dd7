"""Ranges of the stored item variances, and the bounds they give on the score of an unseen item.

VarianceStats is gathered while an index is built and kept in its manifest ("variance_stats");
VarianceBounds reads it back at query time. engine/shortlist.py uses the bounds to grow a
shortlist until it provably holds the probabilistic top-k.


The ANN stage ranks by ⟨μ_q, μ_d⟩ only. Every closed-form score of the contract is a function
of ‖Δμ‖² = ‖μ_q‖² + ‖μ_d‖² − 2⟨μ_q, μ_d⟩ and of the two variances. If the shortlist holds the
top-n items by inner product and the n-th has inner product t, then every item outside it has
‖Δμ‖² ≥ δ = ‖μ_q‖² + min‖μ_d‖² − 2t. The build stored the global ranges of the stored item
variances (VarianceStats below), per stratum of items alike in Σ log v:
per-dimension min/max of log v, and the minimum over the stratum of Σ log v and of Σ v.
From δ and those ranges each score gets an upper bound, per stratum, on what any unseen item
could reach (as a rank key, higher is better); the bound is the max over strata:

  csd    ≥ δ + Σv_q + min Σv_d
  w2     ≥ δ + Σ_d (σ_q,d − clip(σ_q,d, σmin_d, σmax_d))²
  elk    Σ Δμ_d²/(v_q,d+v_d,d) ≥ δ / max_d(v_q,d + vmax_d)   (weights differ per dimension)
         Σ log(v_q,d+v_d,d) ≥ max(Σ log(v_q,d + vmin_d),  min Σlog v_d + Σ log(1 + v_q,d/vmax_d))
  bhattacharyya  ⅛ΣΔμ²/v̄ ≥ ⅛δ / max_d(½(v_q,d+vmax_d)), and its log-det part is
         Σ log cosh(½ log(v_d/v_q)), smallest at the v_d in [vmin, vmax] closest to v_q.

Every bound has the form C − α·δ, so instead of doubling the shortlist blindly the engine
solves for the inner product t* at which the bound falls below the current k-th best key
(with a small rounding margin) and rescores every item with ⟨μ_q, μ_d⟩ > t*: a prefix of the
ANN list it already holds (200·k deep), or one FAISS range search when the list ends above t*.
Rescoring them can only raise the k-th best key, so t* only gets safer: one round suffices
(engine/batch.py). If the first shortlist already proves itself, nothing is added.
So for these scores the result equals exhaustive search whenever the ANN stage finds every
item above t*: always for Flat and for IVF with nprobe = nlist; with fewer probes it is as
good as the ANN recall of the μ ranking (the build chose nprobe for that; `bench` measures
the end result against `--exact`). The bounds are loose where item variances vary a lot
(they pair the smallest log-det with the largest variances), which costs shortlist length,
never correctness; the strata keep them tight when variance is mostly a per-item scale.
What remains loose is α: Σ Δμ_d²/(v_q,d+v_d,d) is bounded with the LARGEST per-dimension
variance, as if all of ‖Δμ‖² sat in that dimension, because nothing about an unseen item's Δμ
but its length is known. When the per-dimension variance profile spreads (synthetic 1M × 256:
max/mean ≈ 2), items up to ~2× the k-th ‖Δμ‖² stay candidates, i.e. about the query's whole
cluster (~950 items at 1M) although the true top-10 lie within μ-rank ~15.

`mc` is stochastic and has no closed form to bound: it uses a fixed shortlist, and `bench`
measures (calibrates) its recall against exhaustive Monte-Carlo scoring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.constants import LOG_2PI
from indexer.store import stored_log_var

REL_TOL = 1e-4   # float32 rescoring error margin: grow rather than risk a rounding miss


class VarianceStats:
    """Ranges of the stored variances of one modality, gathered while the index is built and
    kept in the manifest. The engine's shortlist bounds (engine/shortlist.py) need them to say
    how good a probabilistic score an item it has not fetched could possibly have.

    Items are split into strata by their Σ_d log v (edges: quantiles of the training sample),
    and each stratum keeps its own ranges. A single global range pairs the smallest log-det of
    any item with the largest variance of any other, which makes the bounds loose; within a
    stratum the items are alike, so the bound per stratum is tight and the engine takes the
    max over strata. Computed on the values as stored (float16), which the engine rescores."""

    def __init__(self, dim: int, edges=()):
        self.edges = np.sort(np.asarray(edges, np.float64))
        strata = len(self.edges) + 1
        self.lv_min = np.full((strata, dim), np.inf)
        self.lv_max = np.full((strata, dim), -np.inf)
        self.sum_lv_min = np.full(strata, np.inf)   # min over the stratum's items of Σ_d log v
        self.sum_v_min = np.full(strata, np.inf)    # min over the stratum's items of Σ_d v
        self.count = np.zeros(strata, np.int64)
        self.sq_norm_min = np.inf                   # min over all items of ‖μ‖² (1 ± rounding)

    def update(self, mu: np.ndarray, log_var: np.ndarray) -> None:
        if not len(mu):
            return
        lv = stored_log_var(log_var).astype(np.float64)
        sums, sums_v = lv.sum(axis=1), np.exp(lv).sum(axis=1)
        stratum = np.searchsorted(self.edges, sums, side="right")
        for s in np.unique(stratum):
            rows = stratum == s
            self.lv_min[s] = np.minimum(self.lv_min[s], lv[rows].min(axis=0))
            self.lv_max[s] = np.maximum(self.lv_max[s], lv[rows].max(axis=0))
            self.sum_lv_min[s] = min(self.sum_lv_min[s], float(sums[rows].min()))
            self.sum_v_min[s] = min(self.sum_v_min[s], float(sums_v[rows].min()))
            self.count[s] += int(rows.sum())
        self.sq_norm_min = min(self.sq_norm_min, float(np.einsum("ij,ij->i", mu, mu).min()))

    def merge(self, other: "VarianceStats") -> None:
        """Fold in the stats of other rows gathered with the same edges (a distributed part)."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("VarianceStats.merge: strata edges differ")
        self.lv_min, self.lv_max = np.minimum(self.lv_min, other.lv_min), np.maximum(self.lv_max, other.lv_max)
        self.sum_lv_min = np.minimum(self.sum_lv_min, other.sum_lv_min)
        self.sum_v_min = np.minimum(self.sum_v_min, other.sum_v_min)
        self.count = self.count + other.count
        self.sq_norm_min = min(self.sq_norm_min, other.sq_norm_min)

    def to_json(self) -> dict:
        used = np.flatnonzero(self.count)
        return {"sq_norm_min": self.sq_norm_min, "edges": self.edges.tolist(),
                "strata": [{"count": int(self.count[s]), "lv_min": self.lv_min[s].tolist(),
                            "lv_max": self.lv_max[s].tolist(),
                            "sum_lv_min": float(self.sum_lv_min[s]),
                            "sum_v_min": float(self.sum_v_min[s])} for s in used]}


@dataclass
class VarianceBounds:
    """Per-stratum σ ranges (rows = strata of items alike in Σ log v; indexer/store.py)."""
    lv_min: np.ndarray       # [S, D] per-dimension min of stored log v
    lv_max: np.ndarray       # [S, D] per-dimension max
    sum_lv_min: np.ndarray   # [S] min over the stratum's items of Σ log v
    sum_v_min: np.ndarray    # [S] min over the stratum's items of Σ v
    sq_norm_min: float       # min over all items of ‖μ‖²

    @classmethod
    def from_json(cls, d: dict) -> "VarianceBounds":
        strata = d["strata"]
        def col(key):
            return np.asarray([s[key] for s in strata], np.float64)
        return cls(col("lv_min"), col("lv_max"), col("sum_lv_min"), col("sum_v_min"),
                   float(d["sq_norm_min"]))


def bound_lines(score: str, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> tuple[np.ndarray, np.ndarray]:
    """(C [S], α [S]): an unseen item of stratum s with ‖Δμ‖² ≥ δ has rank key ≤ C_s − α_s·δ
    (the module's bounds, per stratum). α = 0 means no bound (mc)."""
    lv_q = lv_q.astype(np.float64)
    v_q, v_min, v_max = np.exp(lv_q), np.exp(b.lv_min), np.exp(b.lv_max)
    ones = np.ones(len(b.sum_v_min))
    if score == "csd":
        return -(v_q.sum() + b.sum_v_min), ones
    if score == "w2":
        s_q = np.exp(0.5 * lv_q)
        gap = s_q - np.clip(s_q, np.exp(0.5 * b.lv_min), np.exp(0.5 * b.lv_max))
        return -(gap ** 2).sum(axis=1), ones
    if score == "elk":
        log_det = np.maximum(np.log(v_q + v_min).sum(axis=1),
                             b.sum_lv_min + np.log1p(v_q / v_max).sum(axis=1))
        return -0.5 * (log_det + len(lv_q) * LOG_2PI), 0.5 / (v_q + v_max).max(axis=1)
    if score == "bhattacharyya":
        log_ratio = np.clip(0.0, b.lv_min - lv_q, b.lv_max - lv_q)   # log(v_d/v_q) nearest 0
        return -np.log(np.cosh(0.5 * log_ratio)).sum(axis=1), 0.25 / (v_q + v_max).max(axis=1)
    return np.full_like(ones, math.inf), 0.0 * ones


def _delta(ip_max: float, mu_q: np.ndarray, b: VarianceBounds) -> float:
    """Smallest ‖Δμ‖² of an item with ⟨μ_q, μ_d⟩ ≤ ip_max."""
    return max(0.0, float(mu_q.astype(np.float64) @ mu_q) + b.sq_norm_min - 2.0 * ip_max)


def unseen_best(score: str, ip_max: float, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> float:
    """Upper bound on the rank key of any item whose ⟨μ_q, μ_d⟩ ≤ ip_max (inf: no bound)."""
    if score == "mu":
        return ip_max
    c, alpha = bound_lines(score, mu_q, lv_q, b)
    return float((c - alpha * _delta(ip_max, mu_q, b)).max())


def required_ip(score: str, kth: float, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> float:
    """Inner product t such that no item with ⟨μ_q, μ_d⟩ ≤ t can reach rank key `kth`
    (with the rounding margin): the shortlist must hold every item above t."""
    if score == "mu":
        return kth
    c, alpha = bound_lines(score, mu_q, lv_q, b)
    if (alpha <= 0.0).any():
        return -math.inf
    delta = float(np.maximum(0.0, (c - margin(kth)) / alpha).max())
    return 0.5 * (float(mu_q.astype(np.float64) @ mu_q) + b.sq_norm_min - delta)


def margin(kth: float) -> float:
    return kth - REL_TOL * (1.0 + abs(kth))
