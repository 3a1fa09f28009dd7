"""PCME's probabilistic soft-contrastive loss (Chun et al., CVPR 2021, Sec. 3), plus its
regularisers: KL to a standard normal and an optional uniformity term on the samples.

Every image and caption is N(μ, diag exp(log_var)). We draw J samples of each with the
reparameterisation z = μ + exp(½·log_var)·ε, so gradients reach both μ and log_var. For an
image i and a caption k the match probability is the mean over the J×J sample pairs of
sigmoid(−a‖z_i − z_k‖ + b); matched pairs are pushed towards p = 1, all other in-batch pairs
towards p = 0.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from core.errors import PcmeError
from core.montecarlo import sample, sample_logits

logger = logging.getLogger(__name__)

def _check_gaussian(mu: torch.Tensor, log_var: torch.Tensor, where: str) -> None:
    if mu.dim() != 2 or mu.shape != log_var.shape:
        raise PcmeError(f"{where}: mu {tuple(mu.shape)} and log_var "
                        f"{tuple(log_var.shape)} must both be [B, D]")


def sample_embeddings(mu: torch.Tensor, log_var: torch.Tensor, n_samples: int,
                      generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> torch.Tensor:
    """[B, J, D] reparameterised samples z = μ + exp(½·log_var)·ε.

    ε is drawn as torch.randn((B, J, D), generator=generator) unless `eps` [B, J, D] is given.
    """
    _check_gaussian(mu, log_var, "sample_embeddings")
    if n_samples < 1:
        raise PcmeError(f"sample_embeddings: n_samples must be >= 1, got {n_samples}")
    shape = (mu.shape[0], n_samples, mu.shape[1])
    if eps is None:
        eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    elif tuple(eps.shape) != shape:
        raise PcmeError(f"sample_embeddings: eps must have shape {shape}, got {tuple(eps.shape)}")
    return sample(mu[:, None, :], log_var[:, None, :], eps)


def match_log_probs(z_img: torch.Tensor, z_txt: torch.Tensor, a, b
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1−p)), each [B_img, B_txt], from samples z_img [B_img, J, D] and
    z_txt [B_txt, J, D]: p = (1/J²) Σ_{j,j'} sigmoid(logit) with the logits of
    core.montecarlo.sample_logits. Both logs are logsumexps of logsigmoid terms, so neither
    underflows when p is near 0 or 1."""
    logit = sample_logits(z_img, z_txt, a, b)                       # [B_img, J, B_txt, J]
    log_pairs = math.log(z_img.shape[1] ** 2)
    log_p = torch.logsumexp(F.logsigmoid(logit), dim=(1, 3)) - log_pairs
    log_not_p = torch.logsumexp(F.logsigmoid(-logit), dim=(1, 3)) - log_pairs
    return log_p, log_not_p


def label_log_likelihood(z_img: torch.Tensor, z_txt: torch.Tensor, a, b, matched: torch.Tensor
                         ) -> torch.Tensor:
    """[B_img, B_txt] log-probability of the observed label of each pair: log p where matched,
    log(1−p) elsewhere. Same value as picking from `match_log_probs`, at half the cost: one
    logsigmoid of the signed logit and one logsumexp."""
    logit = sample_logits(z_img, z_txt, a, b)
    sign = matched.to(logit.dtype).mul(2.0).sub(1.0)[:, None, :, None]  # +1 matched, −1 not
    return torch.logsumexp(F.logsigmoid(sign * logit), dim=(1, 3)) - math.log(z_img.shape[1] ** 2)


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """[B] KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (σ² + μ² − 1 − log σ²)."""
    return 0.5 * (log_var.exp() + mu ** 2 - 1.0 - log_var).sum(-1)


def uniformity(z: torch.Tensor) -> torch.Tensor:
    """Wang & Isola's uniformity: log of the mean over distinct pairs of exp(−2‖z − z'‖²).

    z is [N, D] (N ≥ 2); computed as a logsumexp so far-apart points do not underflow to log 0.
    """
    n = len(z)
    if n < 2:
        raise PcmeError(f"uniformity: needs at least 2 points, got {n}")
    sq = (z ** 2).sum(-1)[:, None] + (z ** 2).sum(-1)[None, :] - 2.0 * z @ z.T
    self_pair = torch.eye(n, dtype=torch.bool, device=z.device)
    # Every unordered pair appears twice in the full matrix: same mean, no index tensors.
    log_terms = torch.where(self_pair, -math.inf, -2.0 * sq.clamp_min(0.0))
    return torch.logsumexp(log_terms.flatten(), dim=0) - math.log(n * (n - 1))


def anchor_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of the mean of each anchor's masked values, both directions averaged:
    image rows, then caption columns. Anchors without a masked value are skipped; 0 if none."""
    sides = []
    for dim in (1, 0):
        n = mask.sum(dim=dim)
        has = n > 0
        if has.any():
            sides.append((torch.where(mask, values, 0.0).sum(dim=dim)[has] / n[has]).mean())
    return torch.stack(sides).mean() if sides else values.new_zeros(())


def _balanced_nll(log_p, log_not_p, matched, balanced: bool = True,
                  anchor_positives: bool = False) -> torch.Tensor:
    """Mean NLL over matched pairs + mean NLL over unmatched pairs (balanced), or the mean over
    all pairs (balanced=False, every pair weighs the same, as in the original PCME).

    Balanced keeps the B positives from drowning in B²−B negatives; but then a caption's false
    negatives (other images it is also true of) weigh ~B times less than its positive, which
    removes most of the pressure that makes generic captions uncertain. An empty group gives 0.
    anchor_positives (balanced only): the positive term is averaged per anchor first (as the
    multi-positive InfoNCE does), so an anchor with many positives (a generic caption under
    plausible positives) weighs as much as one with a single positive, not many times more.
    """
    if not balanced:
        return -torch.where(matched, log_p, log_not_p).mean()
    zero = log_p.new_zeros(())
    if anchor_positives:
        pos = -anchor_mean(log_p, matched)
    else:
        pos = -log_p[matched].mean() if matched.any() else zero
    neg = -log_not_p[~matched].mean() if (~matched).any() else zero
    return pos + neg


def hard_negative_nll(loglik: torch.Tensor, matched: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean NLL over matched pairs + a hardness-weighted NLL over unmatched pairs.

    Not in the PCME paper: an option for studying why PCME trails InfoNCE. Each anchor (an image
    row, a caption column) spreads unit weight over its negatives in proportion to p(match)^beta,
    detached, so the negatives it confuses most get the push, as under a softmax. The two
    directions are averaged. beta = 0 is the plain mean over each anchor's negatives.
    `loglik` holds log p on matched pairs and log(1 − p) elsewhere (label_log_likelihood).
    """
    zero = loglik.new_zeros(())
    pos = -loglik[matched].mean() if matched.any() else zero
    neg = ~matched
    if not neg.any():
        return pos
    log_p = torch.log(-torch.expm1(loglik.detach().clamp(max=-1e-12)))  # log p of a negative
    scores = torch.where(neg, beta * log_p, -math.inf)
    terms = torch.where(neg, -loglik, 0.0)
    sides = []
    for dim in (1, 0):  # image rows, caption columns
        has = neg.any(dim=dim)
        w = torch.softmax(scores, dim=dim).nan_to_num(0.0)
        sides.append((w * terms).sum(dim=dim)[has].mean())
    return pos + 0.5 * (sides[0] + sides[1])


def _check_loss_inputs(img_mu, img_log_var, txt_mu, txt_log_var, matched, n_samples) -> None:
    _check_gaussian(img_mu, img_log_var, "pcme_loss: image")
    _check_gaussian(txt_mu, txt_log_var, "pcme_loss: text")
    if img_mu.shape[1] != txt_mu.shape[1]:
        raise PcmeError(f"pcme_loss: image dim {img_mu.shape[1]} != text dim {txt_mu.shape[1]}")
    expected = (img_mu.shape[0], txt_mu.shape[0])
    if tuple(matched.shape) != expected or matched.dtype != torch.bool:
        raise PcmeError(f"pcme_loss: matched must be a bool tensor of shape {expected}, got "
                        f"{matched.dtype} {tuple(matched.shape)}")
    if n_samples < 1:
        raise PcmeError(f"pcme_loss: n_samples must be >= 1, got {n_samples}")


def pcme_loss(img_mu, img_log_var, txt_mu, txt_log_var, matched: torch.Tensor,
              a: torch.Tensor, b: torch.Tensor, n_samples: int, kl_weight: float = 1e-4,
              uniformity_weight: float = 0.0, generator: torch.Generator | None = None,
              img_eps: torch.Tensor | None = None, txt_eps: torch.Tensor | None = None,
              balanced: bool = True, hard_negative_beta: float | None = None,
              anchor_positives: bool = False) -> dict:
    """PCME loss for a batch of B_img images and B_txt captions; matched [B_img, B_txt] bool.

    `a` must be positive (the model passes softplus or exp of a raw parameter); a and b are
    scalar tensors and receive gradients. Noise is drawn from `generator`, images first, then
    captions, unless given as img_eps [B_img, J, D] / txt_eps [B_txt, J, D].

    Returns {"loss", "nll", "kl", "uniformity", "pos_prob", "neg_prob"}: loss = nll +
    kl_weight·kl + uniformity_weight·uniformity; kl is the mean over all items of both
    modalities; uniformity is 0 (and not computed) when its weight is 0; pos_prob / neg_prob
    are the mean match probabilities of matched / unmatched pairs (detached, for logging).
    """
    _check_loss_inputs(img_mu, img_log_var, txt_mu, txt_log_var, matched, n_samples)
    z_img = sample_embeddings(img_mu, img_log_var, n_samples, generator, img_eps)
    z_txt = sample_embeddings(txt_mu, txt_log_var, n_samples, generator, txt_eps)
    loglik = label_log_likelihood(z_img, z_txt, a, b, matched)
    if hard_negative_beta is None:
        nll = _balanced_nll(loglik, loglik, matched, balanced, anchor_positives)
    else:
        nll = hard_negative_nll(loglik, matched, hard_negative_beta)
    kl = torch.cat([kl_to_standard_normal(img_mu, img_log_var),
                    kl_to_standard_normal(txt_mu, txt_log_var)]).mean()
    unif = nll.new_zeros(())
    if uniformity_weight:
        unif = uniformity(torch.cat([z_img, z_txt]).flatten(0, 1))
    lik = loglik.detach().exp()
    prob = torch.where(matched, lik, 1.0 - lik)  # p(match) of every pair
    nan = prob.new_tensor(float("nan"))
    return {
        "loss": nll + kl_weight * kl + uniformity_weight * unif,
        "nll": nll,
        "kl": kl,
        "uniformity": unif,
        "pos_prob": prob[matched].mean() if matched.any() else nan,
        "neg_prob": prob[~matched].mean() if (~matched).any() else nan,
    }
