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
         ½Σ log v̄ − ¼Σ log(v_q v_d) = ½ Σ log cosh(½ log(v_d/v_q)), smallest at the v_d in
         [vmin, vmax] closest to v_q.

Every bound has the form C − F(δ) with F increasing (the line α·δ, or the knapsack below),
so instead of doubling the shortlist blindly the engine solves for the inner product t* at
which the bound falls below the current k-th best key (with a small rounding margin) and
rescores every item with ⟨μ_q, μ_d⟩ > t*: a prefix of the ANN list it already holds (200·k
deep), or one FAISS range search when the list ends above t*.
Rescoring them can only raise the k-th best key, so t* only gets safer: one round suffices
(engine/batch.py). If the first shortlist already proves itself, nothing is added.
So for these scores the result equals exhaustive search whenever the ANN stage finds every
item above t*: always for Flat and for IVF with nprobe = nlist; with fewer probes it is as
good as the ANN recall of the μ ranking (the build chose nprobe for that; `bench` measures
the end result against `--exact`). The bounds are loose where item variances vary a lot
(they pair the smallest log-det with the largest variances), which costs shortlist length,
never correctness; the strata keep them tight when variance is mostly a per-item scale.
What the line leaves loose is α: Σ Δμ_d²/(v_q,d+v_d,d) is bounded with the LARGEST
per-dimension variance, as if all of ‖Δμ‖² sat in that dimension. The build also keeps the
per-dimension range [μmin_d, μmax_d] of the stored μ, so an unseen item's Δμ_d² is capped by
c_d = max((μ_q,d − μmin_d)², (μ_q,d − μmax_d)²): the mass δ cannot sit in one dimension. The
least Σ_d w_d Δμ_d² with Σ Δμ_d² ≥ δ and 0 ≤ Δμ_d² ≤ c_d is a continuous knapsack (fill the
smallest weights first): F(δ), convex and piecewise linear, which replaces α·δ (`Knapsack`).
Without the μ range (manifests written before it) there are no caps and F is the old line.
The caps help only as far as one dimension's range is small next to δ; on the synthetic
1M × 256 data the shortlist stays about the query's whole cluster (README: measured).

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
        self.mu_min = np.full(dim, np.inf)          # per-dimension range of μ: caps on Δμ_d²
        self.mu_max = np.full(dim, -np.inf)

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
        self.mu_min = np.minimum(self.mu_min, mu.min(axis=0))
        self.mu_max = np.maximum(self.mu_max, mu.max(axis=0))

    def merge(self, other: "VarianceStats") -> None:
        """Fold in the stats of other rows gathered with the same edges (a distributed part)."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("VarianceStats.merge: strata edges differ")
        self.lv_min, self.lv_max = np.minimum(self.lv_min, other.lv_min), np.maximum(self.lv_max, other.lv_max)
        self.sum_lv_min = np.minimum(self.sum_lv_min, other.sum_lv_min)
        self.sum_v_min = np.minimum(self.sum_v_min, other.sum_v_min)
        self.count = self.count + other.count
        self.sq_norm_min = min(self.sq_norm_min, other.sq_norm_min)
        self.mu_min, self.mu_max = np.minimum(self.mu_min, other.mu_min), np.maximum(self.mu_max, other.mu_max)

    def to_json(self) -> dict:
        used = np.flatnonzero(self.count)
        return {"sq_norm_min": self.sq_norm_min, "edges": self.edges.tolist(),
                "mu_min": self.mu_min.tolist(), "mu_max": self.mu_max.tolist(),
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
    mu_min: np.ndarray | None = None   # [D] per-dimension range of μ (None: older manifest)
    mu_max: np.ndarray | None = None

    @classmethod
    def from_json(cls, d: dict) -> "VarianceBounds":
        strata = d["strata"]
        def col(key):
            return np.asarray([s[key] for s in strata], np.float64)
        mu_range = [np.asarray(d[k], np.float64) if k in d else None for k in ("mu_min", "mu_max")]
        return cls(col("lv_min"), col("lv_max"), col("sum_lv_min"), col("sum_v_min"),
                   float(d["sq_norm_min"]), *mu_range)

    def __post_init__(self):   # per query only the query's terms are computed (hot path)
        self.v_min, self.v_max = np.exp(self.lv_min), np.exp(self.lv_max)
        self.s_min, self.s_max = np.exp(0.5 * self.lv_min), np.exp(0.5 * self.lv_max)

    def caps(self, mu_q: np.ndarray) -> np.ndarray | None:
        """[D] largest Δμ_d² any stored item can have with the query (None: range unknown)."""
        if self.mu_min is None:
            return None
        q = mu_q.astype(np.float64)
        far = np.maximum((q - self.mu_min) ** 2, (q - self.mu_max) ** 2)
        return far * (1.0 + 1e-6) + 1e-12   # the stored float32 μ rounds the other way


class Knapsack:
    """F_s(δ) = min Σ_d W_s,d·x_d subject to Σ_d x_d ≥ δ, 0 ≤ x_d ≤ c_d, for each stratum s:
    the least weighted ‖Δμ‖² an item at squared distance ≥ δ can have. Filling the smallest
    weights first solves it, so F_s is piecewise linear with breakpoints at the caps' partial
    sums; δ beyond Σ c_d is unreachable (F = inf). Without caps (None) F_s is the line
    δ·min_d W_s,d."""

    def __init__(self, weights: np.ndarray, caps: np.ndarray | None):
        self.caps = caps
        if caps is None:
            self.slope = weights.min(axis=1)
            return
        order = np.argsort(weights, axis=1)
        self.w = np.take_along_axis(weights, order, axis=1)          # [S, D] ascending
        c = caps[order]
        self.mass = np.cumsum(c, axis=1)                             # Σ x after each fill
        self.cost = np.cumsum(c * self.w, axis=1)                    # Σ w·x after each fill

    def _before(self, table: np.ndarray, j: np.ndarray) -> np.ndarray:
        rows = np.arange(len(table))
        return np.where(j > 0, table[rows, np.maximum(j - 1, 0)], 0.0)

    def value(self, delta: float) -> np.ndarray:
        """[S] F_s(δ)."""
        if self.caps is None:
            return self.slope * delta
        j = np.minimum((self.mass < delta).sum(axis=1), self.w.shape[1] - 1)  # dims filled
        out = self._before(self.cost, j) + (delta - self._before(self.mass, j)) \
            * self.w[np.arange(len(j)), j]
        return np.where(delta > self.mass[:, -1], np.inf, out)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """[S] the largest δ with F_s(δ) ≤ y_s (0 where y_s ≤ 0; Σ c_d where all of it fits)."""
        if self.caps is None:
            return np.maximum(0.0, y) / self.slope
        j = np.minimum((self.cost < y[:, None]).sum(axis=1), self.w.shape[1] - 1)
        lo = self._before(self.mass, j)
        out = lo + (y - self._before(self.cost, j)) / self.w[np.arange(len(j)), j]
        out = np.minimum(out, self.mass[np.arange(len(j)), j])
        return np.where(y <= 0, 0.0, out)


def bound_terms(score: str, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> tuple[np.ndarray, np.ndarray | None]:
    """(C [S], W [S, D]): an unseen item of stratum s with ‖Δμ‖² ≥ δ has rank key
    ≤ C_s − F_s(δ), F_s the knapsack of weights W_s under the caps b.caps(μ_q) (the module's
    bounds, per stratum). W None means no bound (mc)."""
    lv_q = lv_q.astype(np.float64)
    v_q = np.exp(lv_q)
    if score == "csd":
        return -(v_q.sum() + b.sum_v_min), np.ones_like(b.v_max)
    if score == "w2":
        s_q = np.exp(0.5 * lv_q)
        gap = s_q - np.clip(s_q, b.s_min, b.s_max)
        return -(gap ** 2).sum(axis=1), np.ones_like(b.v_max)
    if score == "elk":
        log_det = np.maximum(np.log(v_q + b.v_min).sum(axis=1),
                             b.sum_lv_min + np.log1p(v_q / b.v_max).sum(axis=1))
        return -0.5 * (log_det + len(lv_q) * LOG_2PI), 0.5 / (v_q + b.v_max)
    if score == "bhattacharyya":
        log_ratio = np.clip(0.0, b.lv_min - lv_q, b.lv_max - lv_q)   # log(v_d/v_q) nearest 0
        return -0.5 * np.log(np.cosh(0.5 * log_ratio)).sum(axis=1), 0.25 / (v_q + b.v_max)
    return np.full(len(b.v_max), math.inf), None


def _delta(ip_max: float, mu_q: np.ndarray, b: VarianceBounds) -> float:
    """Smallest ‖Δμ‖² of an item with ⟨μ_q, μ_d⟩ ≤ ip_max."""
    return max(0.0, float(mu_q.astype(np.float64) @ mu_q) + b.sq_norm_min - 2.0 * ip_max)


def unseen_best(score: str, ip_max: float, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> float:
    """Upper bound on the rank key of any item whose ⟨μ_q, μ_d⟩ ≤ ip_max (inf: no bound;
    -inf: no stored item can be that far)."""
    if score == "mu":
        return ip_max
    c, w = bound_terms(score, mu_q, lv_q, b)
    if w is None:
        return math.inf
    return float((c - Knapsack(w, b.caps(mu_q)).value(_delta(ip_max, mu_q, b))).max())


def required_ip(score: str, kth: float, mu_q: np.ndarray, lv_q: np.ndarray,
                b: VarianceBounds) -> float:
    """Inner product t such that no item with ⟨μ_q, μ_d⟩ ≤ t can reach rank key `kth`
    (with the rounding margin): the shortlist must hold every item above t."""
    if score == "mu":
        return kth
    c, w = bound_terms(score, mu_q, lv_q, b)
    if w is None:
        return -math.inf
    y, caps = c - margin(kth), b.caps(mu_q)
    if caps is None:
        return _ip_at(Knapsack(w, None).inverse(y).max(), mu_q, b)
    # A stratum's capped δ is at most its line's: solve the stratum of the longest line first,
    # then only the strata whose line still reaches past it (few: keeps the sorts off the path).
    line = np.maximum(0.0, y) / w.min(axis=1)
    top = int(line.argmax())
    delta = float(Knapsack(w[top:top + 1], caps).inverse(y[top:top + 1])[0])
    rest = np.flatnonzero((line > delta) & (np.arange(len(line)) != top))
    if len(rest):
        delta = max(delta, float(Knapsack(w[rest], caps).inverse(y[rest]).max()))
    return _ip_at(delta, mu_q, b)


def _ip_at(delta: float, mu_q: np.ndarray, b: VarianceBounds) -> float:
    """The inner product at which ‖Δμ‖² ≥ δ is guaranteed (the inverse of _delta)."""
    return 0.5 * (float(mu_q.astype(np.float64) @ mu_q) + b.sq_norm_min - delta)


def margin(kth: float) -> float:
    return kth - REL_TOL * (1.0 + abs(kth))
