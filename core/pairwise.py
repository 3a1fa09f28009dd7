"""Full [Q, M] score matrices in query chunks, for evaluation and exhaustive search.

Fast paths where the score allows one (mu: one matmul; csd and w2: squared distances between
augmented vectors via the matmul identity); elk and bhattacharyya share the spread kernel of
core/scores.py; mc calls match_prob per chunk with noise drawn once for the whole matrix.
"""
from __future__ import annotations

import torch

from core.errors import PcmeError
from core.montecarlo import _noise, match_prob
from core.scores import (bhattacharyya_from_kernel, check_dims, check_sides, elk_from_kernel,
                         score_name, spread_kernel)

# bytes of ONE chunk-sized temporary. Small chunks are faster on CPU (freed blocks are reused
# instead of fresh pages faulted in) and keep the few live temporaries far below 256 MB.
_TEMP_BYTES = 4 * 2**20


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
    check_sides(mu_q, lv_q, mu_d, lv_d)
    check_dims(mu_q, mu_d)


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
    name = score_name(name)
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
    c = 1.0 if name == "elk" else 0.5
    kernel = _chunked_kernel(mu_q, lv_q, mu_d, lv_d, c, _query_chunk(chunk, *mu_d.shape))
    dim = mu_q.shape[1]
    if name == "elk":
        return elk_from_kernel(kernel, dim)
    return bhattacharyya_from_kernel(kernel, lv_q.sum(-1)[:, None], lv_d.sum(-1)[None, :], dim)


def _chunked_kernel(mu_q, lv_q, mu_d, lv_d, c: float, step: int) -> torch.Tensor:
    """[Q, M] spread kernel (core.scores.spread_kernel), `step` queries at a time broadcast
    against all items; v is exponentiated once per item, not per pair."""
    v_q, v_d = lv_q.exp(), lv_d.exp()
    return torch.cat([spread_kernel(mu_q[s:s + step, None], v_q[s:s + step, None], mu_d[None],
                                    v_d[None], c) for s in range(0, mu_q.shape[0], step)])


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
