"""The Monte-Carlo match probability of PCME on the training side, in torch.

Each side is sampled with the reparameterisation z = μ + exp(½·log_var)·ε, and a pair of samples
matches with probability sigmoid(−a‖z_q − z_d‖ + b). `sample_logits` is the loss's kernel:
it takes log-sigmoids of it (encoders/training/losses.py); `match_prob_block` averages its
sigmoid over all J×J sample pairs of a [Q, M] block, and the contract function `match_prob`
does the same for arbitrary broadcast shapes.

Serving and eval use the same probability under fixed per-item noise, in numpy
(core/served_mc.py: fixed_match_prob, item_noise); tests/test_noise_rows.py checks its sums
against match_prob_block here.
"""
from __future__ import annotations

import torch

from core.constants import DIST_EPS
from core.errors import PcmeError


def sample(mu: torch.Tensor, log_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = μ + exp(½·log_var)·ε, broadcasting (ε carries the sample axis)."""
    return torch.addcmul(mu, torch.exp(0.5 * log_var), eps)   # one pass (mu + s * eps: 7x slower
                                                              # when eps broadcasts a middle axis)


def _logit(sq: torch.Tensor, a, b) -> torch.Tensor:
    """−a·√(max(sq, 0) + DIST_EPS) + b (core/served_mc.py: _match_logistic serves it)."""
    return -a * torch.sqrt(sq.clamp_min(0.0) + DIST_EPS) + b


def sample_logits(z_q: torch.Tensor, z_d: torch.Tensor, a, b) -> torch.Tensor:
    """[Q, J, M, J] logits −a‖z_q^j − z_d^j'‖ + b of every sample pair, from samples
    z_q [Q, J, D] and z_d [M, J, D]: one matmul via ‖x‖² + ‖y‖² − 2⟨x, y⟩."""
    if z_q.dim() != 3 or z_d.dim() != 3 or z_q.shape[1:] != z_d.shape[1:]:
        raise PcmeError(f"sample_logits: samples must be [B, J, D] with the same J and D, got "
                        f"{tuple(z_q.shape)} and {tuple(z_d.shape)}")
    (q, j, dim), m = z_q.shape, z_d.shape[0]
    x, y = z_q.reshape(-1, dim), z_d.reshape(-1, dim)
    sq = (x ** 2).sum(-1)[:, None] + (y ** 2).sum(-1)[None, :] - 2.0 * x @ y.T
    return _logit(sq, a, b).reshape(q, j, m, j)


def match_prob_block(mu_q, lv_q, mu_d, lv_d, eps_q, eps_d, a, b) -> torch.Tensor:
    """[Q, M] match probability of every query-item pair, all J×J sample pairs in one matmul.
    mu/lv: [Q, D] and [M, D]; eps_q [J, Q or 1, D], eps_d [J, M, D]."""
    z_q = sample(mu_q, lv_q, eps_q).movedim(0, 1)   # [Q, J, D]
    z_d = sample(mu_d, lv_d, eps_d).movedim(0, 1)   # [M, J, D]
    return sample_logits(z_q, z_d, a, b).sigmoid().mean(dim=(1, 3))


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

    Broadcasts over leading dimensions like every contract score. J = n_samples samples of each
    side; the noise is drawn from `generator` (query side first) unless given: eps_q has shape
    (J, *mu_q.shape), eps_d (J, *mu_d.shape). Squared distances come from an einsum, one sample
    pair (j, j') at a time, so the working set stays a few tensors of the output's shape.
    """
    from core.scores import check_gauss  # the shape checks live with the closed forms

    out_shape = check_gauss(mu_q, log_var_q, mu_d, log_var_d)
    if n_samples < 1:
        raise PcmeError(f"match_prob: n_samples must be >= 1, got {n_samples}")
    z_q = sample(mu_q, log_var_q, _noise(eps_q, mu_q, n_samples, generator, "q"))
    z_d = sample(mu_d, log_var_d, _noise(eps_d, mu_d, n_samples, generator, "d"))
    sq_q, sq_d = (z_q ** 2).sum(-1), (z_d ** 2).sum(-1)
    total = torch.zeros(out_shape, dtype=z_q.dtype, device=z_q.device)
    for j in range(n_samples):
        for k in range(n_samples):
            cross = torch.einsum("...d,...d->...", z_q[j], z_d[k])
            total = total + _logit(sq_q[j] - 2.0 * cross + sq_d[k], a, b).sigmoid()
    return total / n_samples**2
