"""Rescoring a shortlist with a probabilistic score.

Candidates arrive gathered per query ([Q, M, D]: every query has its own shortlist), so one
call of a core kernel scores a whole batch of queries by broadcasting. `mc` uses the fixed
per-item noise of core/served_mc.py, so an item's score does not depend on which other items
share the shortlist, and exact search (and eval) give the same number.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np

from core.constants import LOG_2PI
from core.errors import PcmeError
from core.served_mc import MC_SAMPLES, fixed_match_prob
from core.scores import (SCORES, bhattacharyya_from_kernel, elk_from_kernel, rank_key,
                         score_name, spread_kernel)

logger = logging.getLogger(__name__)

# Elements per temporary of a rescoring step: 256 KiB of float32. The kernel makes ~6 such
# temporaries; at this size they stay in cache and malloc reuses them. One [740, 256] step
# took 1.7 ms, the same rows in 256-row pieces 0.41 ms (fresh pages fault on every big op).
CHUNK_FLOATS = 1 << 16


def rescore_gathered(score: str, mu_q: np.ndarray, lv_q: np.ndarray, mu_d: np.ndarray,
                     lv_d: np.ndarray, ids: np.ndarray, a: float, b: float,
                     mc_samples: int = MC_SAMPLES) -> np.ndarray:
    """Rank key (higher = better) [Q, M] of each query's own M candidates.
    mu_q, lv_q: [Q, D]; mu_d, lv_d: [Q, M, D]; ids: [Q, M] (they key the `mc` noise)."""
    score = score_name(score)
    if mu_q.ndim != 2 or mu_d.ndim != 3 or mu_d.shape[0] != mu_q.shape[0] \
            or mu_d.shape[2] != mu_q.shape[1] or ids.shape != mu_d.shape[:2]:
        raise PcmeError(f"rescore: expected queries [Q, D], candidates [Q, M, D], ids [Q, M]; "
                        f"got {mu_q.shape}, {mu_d.shape}, {ids.shape}")
    dim = mu_q.shape[1]
    if score in ("elk", "bhattacharyya"):  # numpy arrays, in cache-sized pieces of M
        step = max(1, CHUNK_FLOATS // (len(mu_q) * dim))
        return np.concatenate([_closed_form(score, mu_q, lv_q, mu_d[:, s:s + step],
                                            lv_d[:, s:s + step])
                               for s in range(0, mu_d.shape[1], step)], axis=1)
    q_mu, q_lv = mu_q[:, None], lv_q[:, None]
    if score == "mu":
        raw = SCORES["mu"][0](q_mu, mu_d)
    elif score == "mc":
        raw = np.stack([fixed_match_prob(q_mu[i], q_lv[i], mu_d[i], lv_d[i], ids[i], a, b,
                                         mc_samples)[0] for i in range(len(q_mu))])
    else:
        raw = SCORES[score][0](q_mu, q_lv, mu_d, lv_d)
    return rank_key(score, raw)


def _closed_form(score, mu_q, lv_q, mu_d, lv_d) -> np.ndarray:
    """elk or bhattacharyya rank keys [Q, M] through the shared kernel, on numpy arrays (see
    spread_kernel for why)."""
    return _spread_keys(score, mu_q[:, None], lv_q[:, None], mu_d, np.exp(lv_d),
                        lambda: lv_d.sum(-1))


def _spread_keys(score, mu_q, lv_q, mu_d, var_d, lv_sum_d) -> np.ndarray:
    """elk or bhattacharyya rank keys (float32) from the items' variances var_d; lv_sum_d()
    gives their Σ log v, which only bhattacharyya reads."""
    dim = mu_q.shape[-1]
    kernel = spread_kernel(mu_q, np.exp(lv_q), mu_d, var_d, 1.0 if score == "elk" else 0.5)
    raw = elk_from_kernel(kernel, dim) if score == "elk" else bhattacharyya_from_kernel(
        kernel, lv_q.sum(-1), lv_sum_d(), dim)
    return rank_key(score, raw).astype(np.float32)


@lru_cache(maxsize=1)
def half_value_table() -> np.ndarray:
    """Every float16 value as float32 (256 KiB), indexed by the value's bits."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


@lru_cache(maxsize=1)
def half_exp_table() -> np.ndarray:
    """exp of every float16 value, as float32 (256 KiB), indexed by the value's bits: the store
    keeps log_var in float16, so a row's variances are a table lookup instead of an exp."""
    with np.errstate(over="ignore", invalid="ignore"):   # inf and nan codes: never stored
        return np.exp(half_value_table())


def spread_terms(score: str, lv_q: np.ndarray) -> tuple[float, float]:
    """(c, key_const) of the compiled spread kernels (engine/kernels.py) for one query: the
    kernel's weight c and the query's constant part of the rank key, so that
    elk key = key_const − ½K and bhattacharyya key = key_const − ½K + ¼Σlv_i
    (core/scores.py: elk_from_kernel, bhattacharyya_from_kernel, negated for bhattacharyya)."""
    dim = len(lv_q)
    if score == "elk":
        return 1.0, -0.5 * dim * LOG_2PI
    return 0.5, 0.5 * dim * math.log(2.0) + 0.25 * float(lv_q.sum(dtype=np.float64))


def rescore(score: str, mu_q, lv_q, mu_d, lv_d, a: float, b: float,
            ids: np.ndarray | None = None, mc_samples: int = MC_SAMPLES) -> np.ndarray:
    """Rank key of each of M candidates for one query: arrays [D] and [M, D] -> [M]."""
    ids = np.arange(len(mu_d)) if ids is None else np.asarray(ids)
    return rescore_gathered(score, mu_q[None], lv_q[None], mu_d[None], lv_d[None],
                            ids[None], a, b, mc_samples)[0]
