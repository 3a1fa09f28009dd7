"""Rescoring a shortlist with a probabilistic score, and the fixed per-item Monte-Carlo noise.

Candidates arrive gathered per query ([Q, M, D]: every query has its own shortlist), so one
call of a contract function from engine/scores.py scores a whole batch of queries by
broadcasting. `mc` draws its noise from a fixed table keyed by item id, so an item's score does
not depend on which other items share the shortlist, and exact search gives the same number.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
import torch

from .errors import PcmeError
from .scores import SCORES, rank_key

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)

MC_SAMPLES = 16
MC_SEED = 0
NOISE_ROWS = 4096      # items share a noise row when their ids agree modulo this


@lru_cache(maxsize=4)
def _noise_table(n_samples: int, dim: int) -> torch.Tensor:
    """[NOISE_ROWS + 1, J, D] fixed standard-normal noise; row NOISE_ROWS is the query's."""
    gen = torch.Generator().manual_seed(MC_SEED)
    return torch.randn(NOISE_ROWS + 1, n_samples, dim, generator=gen)


def item_noise(ids: np.ndarray, n_samples: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item noise keyed by id. For ids of shape S returns (eps_q [J, 1…, D] broadcastable
    to S, eps_d [J, *S, D])."""
    table = _noise_table(n_samples, dim)
    ids = np.asarray(ids, dtype=np.int64)
    rows = torch.from_numpy(ids % NOISE_ROWS)
    eps_d = table[rows].movedim(-2, 0)                          # (*S, J, D) -> (J, *S, D)
    eps_q = table[NOISE_ROWS].reshape(n_samples, *([1] * ids.ndim), dim)
    return eps_q, eps_d


def check_score(score: str) -> None:
    if score not in SCORES:
        raise PcmeError(f"--score {score}: choose one of {', '.join(SCORES)}")


def rescore_gathered(score: str, mu_q: np.ndarray, lv_q: np.ndarray, mu_d: np.ndarray,
                     lv_d: np.ndarray, ids: np.ndarray, a: float, b: float) -> np.ndarray:
    """Rank key (higher = better) [Q, M] of each query's own M candidates.
    mu_q, lv_q: [Q, D]; mu_d, lv_d: [Q, M, D]; ids: [Q, M] (they key the `mc` noise)."""
    check_score(score)
    if mu_q.ndim != 2 or mu_d.ndim != 3 or mu_d.shape[0] != mu_q.shape[0] \
            or mu_d.shape[2] != mu_q.shape[1] or ids.shape != mu_d.shape[:2]:
        raise PcmeError(f"rescore: expected queries [Q, D], candidates [Q, M, D], ids [Q, M]; "
                        f"got {mu_q.shape}, {mu_d.shape}, {ids.shape}")
    if score in ("elk", "bhattacharyya"):
        raw = _spread_score(score, mu_q, lv_q, mu_d, lv_d)
        return raw if score == "elk" else -raw
    q_mu, q_lv = torch.from_numpy(mu_q)[:, None], torch.from_numpy(lv_q)[:, None]
    d_mu, d_lv = torch.from_numpy(mu_d), torch.from_numpy(lv_d)
    if score == "mu":
        raw = SCORES["mu"][0](q_mu, d_mu)
    elif score == "mc":
        raw = _mc(q_mu, q_lv, d_mu, d_lv, ids, a, b)
    else:
        raw = SCORES[score][0](q_mu, q_lv, d_mu, d_lv)
    return rank_key(score, raw).numpy()


def _spread_score(score, mu_q, lv_q, mu_d, lv_d) -> np.ndarray:
    """elk / bhattacharyya [Q, M] from m = ΣΔμ²/s and L = Σ log s, s = v_q + v_d, in numpy
    float32 and mostly in place: the contract functions work in log space (logaddexp) in
    torch, 3-5× slower on a shortlist of ~100 (per-call overhead dominates there). Agrees
    with them to float32 rounding wherever v does not underflow (log_var > about −80).
      elk = −½(m + L + D log 2π);  bhattacharyya = ¼m + ½L − ½D log 2 − ¼(Σlv_q + Σlv_d)."""
    spread = np.exp(lv_d)
    spread += np.exp(lv_q)[:, None]
    x = mu_d - mu_q[:, None]
    x *= x
    x /= spread
    m = x.sum(-1)
    L = np.log(spread, out=spread).sum(-1)
    dim = mu_q.shape[-1]
    if score == "elk":
        return -0.5 * (m + L + dim * _LOG_2PI)
    own = lv_q.sum(-1)[:, None] + lv_d.sum(-1)
    return 0.25 * m + 0.5 * L - 0.5 * dim * math.log(2.0) - 0.25 * own


def _mc(q_mu, q_lv, d_mu, d_lv, ids, a, b) -> torch.Tensor:
    """[Q, M] for gathered candidates: each query against its own M, one matmul per query."""
    eps_q, eps_d = item_noise(ids, MC_SAMPLES, d_mu.shape[-1])      # (J,1,1,D), (J,Q,M,D)
    return torch.stack([mc_block(q_mu[i], q_lv[i], d_mu[i], d_lv[i], eps_q[:, 0], eps_d[:, i],
                                 a, b)[0] for i in range(len(q_mu))])


def mc_block(q_mu, q_lv, d_mu, d_lv, eps_q, eps_d, a, b) -> torch.Tensor:
    """[Q, M] match probability with ALL J×J sample pairs of all Q×M pairs in one matmul:
    (J·Q, D) @ (D, J·M). match_prob loops over the J² sample pairs with small einsums, which
    costs ~100× more here, both for a shortlist and for a million items (engine/exact.py)."""
    j, q, m = eps_q.shape[0], len(q_mu), len(d_mu)
    z_q = (q_mu + torch.exp(0.5 * q_lv) * eps_q).reshape(j * q, -1)   # eps_q: (J, 1, D)
    z_d = (d_mu + torch.exp(0.5 * d_lv) * eps_d).reshape(j * m, -1)   # eps_d: (J, M, D)
    x = z_q @ z_d.T
    x.mul_(-2.0).add_((z_q ** 2).sum(-1)[:, None]).add_((z_d ** 2).sum(-1)[None])
    x.clamp_(min=0.0).sqrt_().mul_(-a).add_(b).sigmoid_()
    return x.reshape(j, q, j, m).mean(dim=(0, 2))


def rescore(score: str, mu_q, lv_q, mu_d, lv_d, a: float, b: float,
            ids: np.ndarray | None = None) -> np.ndarray:
    """Rank key of each of M candidates for one query: arrays [D] and [M, D] -> [M]."""
    ids = np.arange(len(mu_d)) if ids is None else np.asarray(ids)
    return rescore_gathered(score, mu_q[None], lv_q[None], mu_d[None], lv_d[None],
                            ids[None], a, b)[0]
