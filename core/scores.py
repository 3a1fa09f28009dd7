"""Score functions between diagonal Gaussians N(μ, diag exp(log_var)): the DESIGN.md contract.

Every score broadcasts over leading dimensions: inputs are (..., D), the output is (...), so
one call scores a query against a shortlist ((D,) vs (M, D)) or a whole grid ((Q, 1, D) vs
(1, M, D)). The closed forms take torch tensors (training, eval) or numpy arrays (the engine)
alike, and this module imports no torch: a text query never loads it. Some scores are
similarities (higher is better), some are distances (lower is better); `SCORES` records which,
`score_name` is the one validator of a user's score name, and `rank_key` turns any score into
"higher is better". The Monte-Carlo score lives in core/montecarlo.py (training, torch) and
core/served_mc.py (fixed noise, numpy), full [Q, M] matrices in core/pairwise.py; the closed
forms' kernels here are shared by all.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from core.constants import DEFAULT_SCORE, LOG_2PI  # noqa: F401  (re-exported)
from core.errors import PcmeError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- shape checks

def _exp(x):
    """exp of a numpy array or a torch tensor, in its own library."""
    return np.exp(x) if isinstance(x, np.ndarray) else x.exp()


def check_dims(mu_q, mu_d) -> None:
    if mu_q.ndim < 1 or mu_d.ndim < 1:
        raise PcmeError(f"scores: inputs must be (..., D), got shapes {tuple(mu_q.shape)} and "
                        f"{tuple(mu_d.shape)}")
    if mu_q.shape[-1] != mu_d.shape[-1]:
        raise PcmeError(f"scores: query dim {mu_q.shape[-1]} != item dim {mu_d.shape[-1]}")


def check_mu(mu_q, mu_d) -> tuple[int, ...]:
    """Check (..., D) inputs; return the broadcast output shape (...)."""
    check_dims(mu_q, mu_d)
    try:
        return np.broadcast_shapes(tuple(mu_q.shape[:-1]), tuple(mu_d.shape[:-1]))
    except ValueError:
        raise PcmeError(f"scores: leading shapes {tuple(mu_q.shape[:-1])} and "
                        f"{tuple(mu_d.shape[:-1])} do not broadcast") from None


def check_sides(mu_q, log_var_q, mu_d, log_var_d) -> None:
    for side, mu, log_var in (("query", mu_q, log_var_q), ("item", mu_d, log_var_d)):
        if mu.shape != log_var.shape:
            raise PcmeError(f"scores: {side} mu shape {tuple(mu.shape)} != log_var shape "
                            f"{tuple(log_var.shape)}")


def check_gauss(mu_q, log_var_q, mu_d, log_var_d) -> tuple[int, ...]:
    check_sides(mu_q, log_var_q, mu_d, log_var_d)
    return check_mu(mu_q, mu_d)


# ---------------------------------------------------------------------------- closed forms

def mu_sim(mu_q, mu_d):
    """<μ_q, μ_d>: cosine similarity for L2-normalised μ (higher is better)."""
    check_mu(mu_q, mu_d)
    if isinstance(mu_q, np.ndarray):
        return np.einsum("...d,...d->...", mu_q, mu_d)   # einsum: no (..., D) broadcast copy
    import torch   # already loaded: the inputs are tensors

    return torch.einsum("...d,...d->...", mu_q, mu_d)


def csd(mu_q, log_var_q, mu_d, log_var_d):
    """‖μ_q−μ_d‖² + Σv_q + Σv_d = E‖z_q − z_d‖² (PCME++ closed-form sampled distance; lower)."""
    check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    return ((mu_q - mu_d) ** 2).sum(-1) + _exp(log_var_q).sum(-1) + _exp(log_var_d).sum(-1)


def spread_kernel(mu_q, var_q, mu_d, var_d, c: float = 1.0):
    """Σ_d [c·Δμ²/s + log s] with s = var_q + var_d (var = exp(log_var); broadcast): the
    non-separable part shared by elk (c = 1) and bhattacharyya (c = ½). The one kernel of
    both scores, used alike by the contract functions, core/pairwise.py and the engine's
    rescoring (which hands it numpy arrays: on a few hundred rows numpy's float32 exp/log beat
    torch's, and no intra-op thread pool waits on a busy core). One op per line, rebinding x,
    so few (..., D) temporaries live. Works in v, not log v: exact wherever v does not
    underflow (log_var above about −80)."""
    spread = var_q + var_d
    x = mu_q - mu_d
    x = x * x
    x = x / spread
    if c != 1.0:
        x = x * c
    x = x + (np.log(spread) if isinstance(spread, np.ndarray) else spread.log())
    return x.sum(-1)


def elk_from_kernel(kernel, dim: int):
    """elk = −½(Σ[Δμ²/s + log s] + D log 2π)."""
    return -0.5 * (kernel + dim * LOG_2PI)


def bhattacharyya_from_kernel(kernel, sum_lv_q, sum_lv_d, dim: int):
    """With v̄ = s/2: ⅛ΣΔμ²/v̄ + ½Σ log v̄ − ¼Σ(log v_q + log v_d)
    = ½·Σ[½Δμ²/s + log s] − ½D log 2 − ¼(Σlv_q + Σlv_d)."""
    return 0.5 * kernel - 0.5 * dim * math.log(2.0) - 0.25 * (sum_lv_q + sum_lv_d)


def elk(mu_q, log_var_q, mu_d, log_var_d):
    """log N(μ_q; μ_d, diag(v_q+v_d)), the log expected likelihood kernel (higher is better)."""
    check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    kernel = spread_kernel(mu_q, _exp(log_var_q), mu_d, _exp(log_var_d))
    return elk_from_kernel(kernel, mu_q.shape[-1])


def w2(mu_q, log_var_q, mu_d, log_var_d):
    """Squared 2-Wasserstein distance ‖Δμ‖² + ‖σ_q − σ_d‖² for diagonal Gaussians (lower)."""
    check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    d_sigma = _exp(0.5 * log_var_q) - _exp(0.5 * log_var_d)
    return ((mu_q - mu_d) ** 2).sum(-1) + (d_sigma ** 2).sum(-1)


def bhattacharyya(mu_q, log_var_q, mu_d, log_var_d):
    """Bhattacharyya distance −log ∫√(p q) between the two diagonal Gaussians (lower)."""
    check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    kernel = spread_kernel(mu_q, _exp(log_var_q), mu_d, _exp(log_var_d), 0.5)
    return bhattacharyya_from_kernel(kernel, log_var_q.sum(-1), log_var_d.sum(-1), mu_q.shape[-1])


def match_prob(*args, **kwargs):
    """The Monte-Carlo match probability: core/montecarlo.py's match_prob (torch only,
    imported when first called)."""
    from core.montecarlo import match_prob as torch_match_prob

    return torch_match_prob(*args, **kwargs)


# ---------------------------------------------------------------------------- registry

# name -> (function, higher_is_better). Signatures differ: mu_sim takes only (mu_q, mu_d) and
# match_prob also needs a, b, n_samples; `pairwise` hides the differences.
SCORES = {
    "mu": (mu_sim, True),
    "csd": (csd, False),
    "elk": (elk, True),
    "w2": (w2, False),
    "bhattacharyya": (bhattacharyya, False),
    "mc": (match_prob, True),   # core/montecarlo.py
}


# What a shown score is, in words (the CLI prints it above the hits). Distances are shown
# negated so that every column sorts the same way: higher is better.
SCORE_MEANING = {
    "mu": "inner product of the μ (cosine similarity), σ ignored; higher is better",
    "csd": "minus the closed-form sampled distance E|z_q - z_d|^2 (a distance, negated); "
           "higher (closer to 0) is better",
    "elk": "log expected likelihood kernel log ∫N(z; q)N(z; d)dz; higher is better",
    "w2": "minus the squared 2-Wasserstein distance (a distance, negated); higher is better",
    "bhattacharyya": "minus the Bhattacharyya distance (a distance, negated); higher is better",
    "mc": "Monte-Carlo match probability sigmoid(-a|z_q - z_d| + b), in [0, 1]; higher is better",
}


def score_name(name: str, what: str = "score") -> str:
    """The canonical name of a user's score choice (case-insensitive), or a one-line error."""
    canonical = str(name).strip().lower()
    if canonical not in SCORES:
        raise PcmeError(f"{what} {name}: unknown; choose one of {', '.join(SCORES)}")
    return canonical


def higher_is_better(name: str) -> bool:
    return SCORES[score_name(name)][1]


def rank_key(name, scores):
    """Raw scores of `name` turned into a key where higher is better (distances are negated);
    works on tensors and numpy arrays alike."""
    return scores if higher_is_better(name) else -scores
