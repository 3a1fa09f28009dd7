"""Score functions between diagonal Gaussians N(μ, diag exp(log_var)): the DESIGN.md contract.

Every score broadcasts over leading dimensions: inputs are (..., D), the output is (...), so
one call scores a query against a shortlist ((D,) vs (M, D)) or a whole grid ((Q, 1, D) vs
(1, M, D)). Some scores are similarities (higher is better), some are distances (lower is
better); `SCORES` records which, and `rank_key` turns any score into "higher is better".

`pairwise` builds a full [Q, M] score matrix in query chunks, with matmul fast paths where the
score allows one, so evaluation over thousands of items stays within a fixed memory budget.
"""
from __future__ import annotations

import logging
import math

import torch

from engine.errors import PcmeError

logger = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)
# pairwise: bytes of ONE chunk-sized temporary. Small chunks are faster on CPU (freed blocks are
# reused instead of fresh pages faulted in) and keep the few live temporaries far below 256 MB.
_TEMP_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------- shape checks

def _check_dims(mu_q: torch.Tensor, mu_d: torch.Tensor) -> None:
    if mu_q.dim() < 1 or mu_d.dim() < 1:
        raise PcmeError(f"scores: inputs must be (..., D), got shapes {tuple(mu_q.shape)} and "
                        f"{tuple(mu_d.shape)}")
    if mu_q.shape[-1] != mu_d.shape[-1]:
        raise PcmeError(f"scores: query dim {mu_q.shape[-1]} != item dim {mu_d.shape[-1]}")


def _check_mu(mu_q: torch.Tensor, mu_d: torch.Tensor) -> torch.Size:
    """Check (..., D) inputs; return the broadcast output shape (...)."""
    _check_dims(mu_q, mu_d)
    try:
        return torch.broadcast_shapes(mu_q.shape[:-1], mu_d.shape[:-1])
    except RuntimeError:
        raise PcmeError(f"scores: leading shapes {tuple(mu_q.shape[:-1])} and "
                        f"{tuple(mu_d.shape[:-1])} do not broadcast") from None


def _check_sides(mu_q, log_var_q, mu_d, log_var_d) -> None:
    for side, mu, log_var in (("query", mu_q, log_var_q), ("item", mu_d, log_var_d)):
        if mu.shape != log_var.shape:
            raise PcmeError(f"scores: {side} mu shape {tuple(mu.shape)} != log_var shape "
                            f"{tuple(log_var.shape)}")


def _check_gauss(mu_q, log_var_q, mu_d, log_var_d) -> torch.Size:
    _check_sides(mu_q, log_var_q, mu_d, log_var_d)
    return _check_mu(mu_q, mu_d)


# ---------------------------------------------------------------------------- closed forms

def mu_sim(mu_q: torch.Tensor, mu_d: torch.Tensor) -> torch.Tensor:
    """<μ_q, μ_d>: cosine similarity for L2-normalised μ (higher is better)."""
    _check_mu(mu_q, mu_d)
    return torch.einsum("...d,...d->...", mu_q, mu_d)  # einsum: no (..., D) broadcast copy


def csd(mu_q, log_var_q, mu_d, log_var_d) -> torch.Tensor:
    """‖μ_q−μ_d‖² + Σv_q + Σv_d = E‖z_q − z_d‖² (PCME++ closed-form sampled distance; lower)."""
    _check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    return ((mu_q - mu_d) ** 2).sum(-1) + log_var_q.exp().sum(-1) + log_var_d.exp().sum(-1)


def elk(mu_q, log_var_q, mu_d, log_var_d) -> torch.Tensor:
    """log N(μ_q; μ_d, diag(v_q+v_d)), the log expected likelihood kernel (higher is better)."""
    _check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    log_v = torch.logaddexp(log_var_q, log_var_d)  # log(v_q + v_d) without overflow
    return -0.5 * ((mu_q - mu_d) ** 2 * torch.exp(-log_v) + log_v + _LOG_2PI).sum(-1)


def w2(mu_q, log_var_q, mu_d, log_var_d) -> torch.Tensor:
    """Squared 2-Wasserstein distance ‖Δμ‖² + ‖σ_q − σ_d‖² for diagonal Gaussians (lower)."""
    _check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    d_sigma = torch.exp(0.5 * log_var_q) - torch.exp(0.5 * log_var_d)
    return ((mu_q - mu_d) ** 2).sum(-1) + (d_sigma ** 2).sum(-1)


def bhattacharyya(mu_q, log_var_q, mu_d, log_var_d) -> torch.Tensor:
    """Bhattacharyya distance −log ∫√(p q) between the two diagonal Gaussians (lower).

    With v = (v_q+v_d)/2: ⅛ Σ Δμ²/v + ½ Σ [log v − ½(log v_q + log v_d)].
    """
    _check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    log_v = torch.logaddexp(log_var_q, log_var_d) - math.log(2.0)
    mahalanobis = ((mu_q - mu_d) ** 2 * torch.exp(-log_v)).sum(-1)
    log_det_ratio = (log_v - 0.5 * (log_var_q + log_var_d)).sum(-1)
    return 0.125 * mahalanobis + 0.5 * log_det_ratio


# ---------------------------------------------------------------------------- Monte Carlo

def _noise(eps, mu, n_samples, generator, side) -> torch.Tensor:
    shape = (n_samples, *mu.shape)
    if eps is None:
        return torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    if tuple(eps.shape) != shape:
        raise PcmeError(f"match_prob: eps_{side} must have shape (n_samples, *mu_{side}.shape) "
                        f"= {shape}, got {tuple(eps.shape)}")
    return eps


def match_prob(mu_q, log_var_q, mu_d, log_var_d, a, b, n_samples: int, generator=None,
               eps_q: torch.Tensor | None = None, eps_d: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Monte-Carlo match probability (1/J²) Σ_{j,j'} sigmoid(−a‖z_q^j − z_d^j'‖ + b) (higher).

    J = n_samples samples of each side, z = μ + exp(½·log_var)·ε. The noise ε of each side is
    drawn from `generator` (query side first, then item side) unless given: `eps_q` must have
    shape (J, *mu_q.shape) and `eps_d` (J, *mu_d.shape); sample j of side x is then exactly
    mu_x + exp(½·log_var_x) * eps_x[j]. Passing eps_d built from per-item seeds makes an item's
    samples, hence its score, independent of which other items share the call.

    Memory: squared distances come from ‖x‖² + ‖y‖² − 2<x, y> with an einsum (a matmul for
    grids: no (..., D) broadcast copy and no (..., J, J, D) tensor), one sample pair (j, j') at
    a time, so the working set stays a few tensors of the output's shape. `a` (> 0) and `b` are
    floats or scalar tensors.
    """
    out_shape = _check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    if n_samples < 1:
        raise PcmeError(f"match_prob: n_samples must be >= 1, got {n_samples}")
    eps_q = _noise(eps_q, mu_q, n_samples, generator, "q")
    eps_d = _noise(eps_d, mu_d, n_samples, generator, "d")
    z_q = mu_q + torch.exp(0.5 * log_var_q) * eps_q   # (J, *q, D)
    z_d = mu_d + torch.exp(0.5 * log_var_d) * eps_d   # (J, *d, D)
    sq_q, sq_d = (z_q ** 2).sum(-1), (z_d ** 2).sum(-1)
    total = torch.zeros(out_shape, dtype=z_q.dtype, device=z_q.device)
    for j in range(n_samples):
        for k in range(n_samples):
            total = total + _pair_prob(z_q[j], sq_q[j], z_d[k], sq_d[k], a, b)
    return total / n_samples**2


def _pair_prob(z_q, sq_q, z_d, sq_d, a, b) -> torch.Tensor:
    """sigmoid(−a‖z_q − z_d‖ + b) for one sample of each side, broadcast to the output shape.
    One operation per line, rebinding `x`, so at most two output-sized temporaries live."""
    x = torch.einsum("...d,...d->...", z_q, z_d)
    x = torch.add(sq_q, x, alpha=-2.0)
    x = x + sq_d
    x = x.clamp_min(0.0)                              # rounding can go slightly below 0
    x = x.sqrt()
    x = x * (-a)
    x = x + b
    return x.sigmoid()


# ---------------------------------------------------------------------------- registry

# name -> (function, higher_is_better). Signatures differ: mu_sim takes only (mu_q, mu_d) and
# match_prob also needs a, b, n_samples; `pairwise` hides the differences.
SCORES = {
    "mu": (mu_sim, True),
    "csd": (csd, False),
    "elk": (elk, True),
    "w2": (w2, False),
    "bhattacharyya": (bhattacharyya, False),
    "mc": (match_prob, True),
}


def _check_name(name: str) -> None:
    if name not in SCORES:
        raise PcmeError(f"unknown score '{name}'; choose one of {', '.join(SCORES)}")


def rank_key(name: str, scores: torch.Tensor) -> torch.Tensor:
    """Raw scores of `name` turned into a key where higher is better (distances are negated)."""
    _check_name(name)
    return scores if SCORES[name][1] else -scores


# ---------------------------------------------------------------------------- pairwise

def _sq_dist_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[Q, M] squared Euclidean distances via ‖x‖² + ‖y‖² − 2 x yᵀ, clamped at 0."""
    sq = (x ** 2).sum(-1)[:, None] + (y ** 2).sum(-1)[None, :] - 2.0 * x @ y.T
    return sq.clamp_min(0.0)


def _query_chunk(chunk: int | None, n_items: int, row_floats: int) -> int:
    """Queries per chunk: `chunk` if given, else so that one temporary of n_items × row_floats
    floats per query fills _TEMP_BYTES."""
    if chunk is not None:
        if chunk < 1:
            raise PcmeError(f"pairwise: chunk must be >= 1, got {chunk}")
        return chunk
    return max(1, _TEMP_BYTES // (4 * max(1, n_items * row_floats)))


def _check_matrices(mu_q, lv_q, mu_d, lv_d) -> None:
    if mu_q.dim() != 2 or mu_d.dim() != 2:
        raise PcmeError(f"pairwise: expected mu_q [Q, D] and mu_d [M, D], got "
                        f"{tuple(mu_q.shape)} and {tuple(mu_d.shape)}")
    _check_sides(mu_q, lv_q, mu_d, lv_d)
    _check_dims(mu_q, mu_d)


def pairwise(name: str, mu_q, lv_q, mu_d, lv_d, chunk: int | None = None,
             **score_kwargs) -> torch.Tensor:
    """[Q, M] matrix of the RAW score `name` (its own sign; see `rank_key` to rank).

    Fast paths: mu is one matmul; csd and w2 are squared distances between (augmented) vectors
    via the matmul identity (w2 = ‖[μ_q, σ_q] − [μ_d, σ_d]‖²). elk and bhattacharyya share one
    elementwise kernel over a chunk of queries against all items; mc calls match_prob per
    chunk; `chunk` queries at a time (default: a few MB per temporary, far below 256 MB).
    The elk/bhattacharyya kernel uses v = exp(log_var) directly (cheaper than log space), so
    it departs from the single-pair functions only where v underflows (log_var < about −80).

    For mc, `score_kwargs` are match_prob's a, b, n_samples and generator, or eps_q (J, Q, D)
    and eps_d (J, M, D); noise is drawn once for the whole matrix, so chunking does not change
    the result. Other scores take no keyword arguments.
    """
    _check_name(name)
    _check_matrices(mu_q, lv_q, mu_d, lv_d)
    if score_kwargs and name != "mc":
        raise PcmeError(f"pairwise: score '{name}' takes no options, got {sorted(score_kwargs)}")
    if name == "mu":
        return mu_q @ mu_d.T
    if name == "csd":
        spread = lv_q.exp().sum(-1)[:, None] + lv_d.exp().sum(-1)[None, :]
        return _sq_dist_matmul(mu_q, mu_d) + spread
    if name == "w2":
        aug_q = torch.cat([mu_q, torch.exp(0.5 * lv_q)], dim=-1)
        aug_d = torch.cat([mu_d, torch.exp(0.5 * lv_d)], dim=-1)
        return _sq_dist_matmul(aug_q, aug_d)
    if name == "mc":
        return _pairwise_mc(mu_q, lv_q, mu_d, lv_d, chunk, **score_kwargs)
    step = _query_chunk(chunk, mu_d.shape[0], mu_d.shape[1])
    dim = mu_q.shape[1]
    if name == "elk":
        kernel = _spread_kernel(mu_q, lv_q, mu_d, lv_d, 1.0, step)
        return -0.5 * (kernel + dim * _LOG_2PI)
    # bhattacharyya with v = s/2: ⅛ΣΔμ²/v + ½Σlog v − ¼Σ(lv_q + lv_d) = ½K(½) − ½D log 2 − ...
    kernel = _spread_kernel(mu_q, lv_q, mu_d, lv_d, 0.5, step)
    own = lv_q.sum(-1)[:, None] + lv_d.sum(-1)[None, :]
    return 0.5 * kernel - 0.5 * dim * math.log(2.0) - 0.25 * own


def _spread_kernel(mu_q, lv_q, mu_d, lv_d, c: float, step: int) -> torch.Tensor:
    """[Q, M] of Σ_d [c·Δμ²/s + log s] with s = v_q + v_d: the non-separable part shared by
    elk and bhattacharyya. v is exponentiated once per item (not per pair), and each chunk
    of `step` queries is broadcast against all items; one op per line keeps temporaries few."""
    v_q, v_d = lv_q.exp(), lv_d.exp()
    rows = []
    for s in range(0, mu_q.shape[0], step):
        spread = v_q[s:s + step, None] + v_d[None]               # (step, M, D)
        x = mu_q[s:s + step, None] - mu_d[None]
        x = x * x
        x = x / spread
        if c != 1.0:
            x = x * c
        x = x + spread.log()
        rows.append(x.sum(-1))
    return torch.cat(rows, dim=0)


def _pairwise_mc(mu_q, lv_q, mu_d, lv_d, chunk, a, b, n_samples: int, generator=None,
                 eps_q=None, eps_d=None) -> torch.Tensor:
    if n_samples < 1:
        raise PcmeError(f"match_prob: n_samples must be >= 1, got {n_samples}")
    # Draw all noise up front (same order as match_prob) so every chunk sees its own slice.
    eps_q = _noise(eps_q, mu_q, n_samples, generator, "q")
    eps_d = _noise(eps_d, mu_d, n_samples, generator, "d")
    step = _query_chunk(chunk, mu_d.shape[0], 1)  # match_prob's temporaries are (step, M)
    rows = [match_prob(mu_q[s:s + step, None], lv_q[s:s + step, None], mu_d[None], lv_d[None],
                       a, b, n_samples, eps_q=eps_q[:, s:s + step, None], eps_d=eps_d[:, None])
            for s in range(0, mu_q.shape[0], step)]
    return torch.cat(rows, dim=0)
