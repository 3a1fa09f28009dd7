"""`--loss prob-nce`: a softmax contrastive loss over a probabilistic score. NOT in the PCME or
PCME++ papers; written here because, at this project's training budget, the papers' pairwise
likelihoods rank below a plain InfoNCE (README, "Losses compared").

Logits are a probabilistic score of every in-batch image-caption pair, ℓ = −scale·CSD (the
closed-form sampled distance ‖μ_i−μ_t‖² + Σσ_i² + Σσ_t², the expected squared distance of
two samples) or ℓ = scale·ELK; the loss is the multi-positive InfoNCE of both directions over
them (each image against all captions, each caption against all images). A softmax
concentrates the push on the negatives that outscore the positive, which is what the pairwise
likelihood spreads thin. The σ terms act as per-item biases: a caption with a larger Σσ² is
pushed away from every image at once, which pays off only for captions the model cannot place.

With `temper` β > 0 (also not in the papers) each anchor's own σ sets the temperature of its
softmax: its row of logits is multiplied by exp(−β·(u − ū)), u = log Σσ² of the anchor and ū
the batch mean of u (not detached, so only σ's spread across anchors is learned by it, never
its level). An anchor whose positives the model ranks badly lowers its loss by flattening its
row, i.e. by a larger σ; one it ranks well by a smaller σ. Under CSD alone a caption's σ is a
constant of its own softmax and learns nothing there. Measured: the multi-positive CE is then
lowest for a generic caption when its softmax is flat over its many true images, so σ learns
how many images fit (ambiguity, as PCME claims), not whether the ranking fails.

With `hit_temper` β > 0 (not in the papers) one more term: −log(the mass a row's softmax puts
on ANY of its positives) at the anchor's σ-set temperature, on DETACHED logits (only σ learns
from it; μ and the ranking loss are untouched). An anchor whose positives already win lowers it
by a sharper softmax (smaller σ), one whose negatives win by a flatter one (larger σ). Measured:
this too made caption σ rise with the number of true matches (a generic caption's positives hold
its row's mass at any temperature, so it is the specific captions that sharpen). Image anchors
always; caption anchors too unless `hit_captions` is off.

With `failure_weight` w > 0 (not in the papers) σ is taught the user's question directly: is
this anchor's top-1 wrong? Per anchor, y = 1 when the best-scoring item of its DETACHED row is
not a positive, and the logistic prediction sigmoid(logit(batch failure rate) + γ·(u − ū))
from its u = log Σσ² is fitted to y by binary cross-entropy (γ = FAILURE_GAMMA; the
centering leaves σ's level to the rest of the loss). Only σ learns from it. Caption anchors
always; image anchors too unless `failure_images` is off (an image's σ also enters every text
query's ranking of it).

With `plausible_weight` w < 1 (not in the papers) the ranking CE weighs a row's positives
unequally: the pairs written for each other count 1, the other plausible positives w (1: all
equal, the default). Plausible positives teach which captions fit an image; the pair's extra
weight asks the row to put its own partner first among them.

The default (`encoders/training/config.py`) uses the failure term on caption anchors and the
tempered term on image anchors: caption σ then predicts a wrong first hit, and the image term
keeps ELK's ranking of text queries (README, "The default recipe").

The match probability p = sigmoid(−a‖z_i − z_t‖ + b) of PCME (what `p_match` reports) is kept
meaningful by training a, b on it: with `pcme_weight` = 0, PCME's likelihood on DETACHED
embeddings (only a and b learn: a calibration, the embeddings are untouched); with
`pcme_weight` > 0, PCME's likelihood itself joins the loss with that weight.
"""
from __future__ import annotations

import torch

from core.errors import PcmeError
from core.pairwise import pairwise
from encoders.training.losses import kl_to_standard_normal, pcme_loss
from encoders.training.losses_baselines import (_multi_positive_ce, own_pairs, pairwise_csd,
                                                pairwise_sq_dist)

NCE_SCORES = ("csd", "elk", "mu", "csd_img")


def nce_logits(score: str, img_mu, img_lv, txt_mu, txt_lv, scale: float) -> torch.Tensor:
    """[B_img, B_txt] logits of the softmax: −scale·CSD, scale·ELK, −scale·‖μ_i−μ_t‖² ("mu":
    σ stays out of the ranking CE and learns only from the σ-only terms, KL and calibration),
    or −scale·(‖μ_i−μ_t‖² + Σσ_i²) ("csd_img": CSD without the caption's Σσ², so only image σ
    is in the ranking CE)."""
    if score == "csd":
        return -scale * pairwise_csd(img_mu, img_lv, txt_mu, txt_lv)
    if score == "mu":
        return -scale * pairwise_sq_dist(img_mu, txt_mu)
    if score == "csd_img":
        return -scale * (pairwise_sq_dist(img_mu, txt_mu) + img_lv.exp().sum(-1)[:, None])
    if score == "elk":
        return scale * pairwise("elk", img_mu, img_lv, txt_mu, txt_lv)
    raise PcmeError(f"nce_score {score!r}: unknown; choose one of {', '.join(NCE_SCORES)}")


def log_total_variance(log_var: torch.Tensor) -> torch.Tensor:
    """[B] u = log Σ_d σ_d² of each row (the log of the project's uncertainty unit), stably."""
    return torch.logsumexp(log_var, dim=1)


def anchor_temperature(log_var: torch.Tensor, beta: float) -> torch.Tensor:
    """[B] factors exp(−β·(u − mean u)), u = log Σ_d σ_d² of each row: a row with the batch's
    geometric-mean Σσ² keeps its logits, one with e× that Σσ² has them scaled by e^−β."""
    u = log_total_variance(log_var)
    return torch.exp(-beta * (u - u.mean()))


def tempered_hit_loss(logits: torch.Tensor, positives: torch.Tensor, log_var: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """Mean over rows with a positive of −log Σ_{positives} softmax(κ·logits.detach()), κ the
    row anchor's anchor_temperature: gradients reach log_var only."""
    kappa = anchor_temperature(log_var, beta)
    log_prob = torch.log_softmax(logits.detach() * kappa[:, None], dim=1)
    hit = torch.logsumexp(log_prob.masked_fill(~positives, float("-inf")), dim=1)
    return -hit[positives.any(dim=1)].mean()


FAILURE_GAMMA = 4.0   # failure_loss: logit change per unit of log Σσ²


def failure_loss(logits: torch.Tensor, positives: torch.Tensor,
                 log_var: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of "the row's top-1 is not a positive" (from DETACHED logits)
    against sigmoid(logit(failure rate) + FAILURE_GAMMA·(u − mean u)), u = log Σσ² of the row's
    anchor, over rows with a positive: gradients reach log_var only."""
    rows = positives.any(dim=1)
    with torch.no_grad():
        top = logits.argmax(dim=1, keepdim=True)
        wrong = (~positives.gather(1, top)[:, 0])[rows].to(log_var.dtype)
        n = len(wrong)
        rate = wrong.mean().clamp(1.0 / (n + 1), n / (n + 1.0))
    u = log_total_variance(log_var)[rows]
    z = torch.logit(rate) + FAILURE_GAMMA * (u - u.mean())
    return torch.nn.functional.binary_cross_entropy_with_logits(z, wrong)


def prob_nce_loss(img_mu, img_log_var, txt_mu, txt_log_var, matched: torch.Tensor, a, b,
                  scale: float, score: str = "csd", kl_weight: float = 1e-4,
                  n_samples: int = 7, pcme_weight: float = 0.0,
                  generator: torch.Generator | None = None, balanced: bool = True,
                  temper: float = 0.0, hit_temper: float = 0.0,
                  failure_weight: float = 0.0, failure_images: bool = True,
                  hit_captions: bool = True, plausible_weight: float = 1.0) -> dict:
    """Returns {"loss", "nce", "kl", "match_nll", "pos_prob", "neg_prob"} (+ "hit" and
    "failure" when those terms are on): loss = ½(CE_i→t + CE_t→i) + hit + failure_weight·failure
    + kl_weight·kl + (pcme_weight or 1)·match_nll, where match_nll is PCME's likelihood (its
    `nll`) on detached embeddings when pcme_weight is 0."""
    logits = nce_logits(score, img_mu, img_log_var, txt_mu, txt_log_var, scale)
    i2t, t2i = logits, logits.T
    if temper:
        i2t = i2t * anchor_temperature(img_log_var, temper)[:, None]
        t2i = t2i * anchor_temperature(txt_log_var, temper)[:, None]
    weights = None
    if plausible_weight != 1.0:  # positives other than the own pairs count plausible_weight
        own = own_pairs(matched)
        weights = torch.where(own, 1.0, plausible_weight).to(logits.dtype)
    nce = 0.5 * (_multi_positive_ce(i2t, matched, weights)
                 + _multi_positive_ce(t2i, matched.T, None if weights is None else weights.T))
    terms, ranked = {}, nce
    if hit_temper:
        hit = tempered_hit_loss(logits, matched, img_log_var, hit_temper)
        if hit_captions:
            hit = 0.5 * (hit + tempered_hit_loss(logits.T, matched.T, txt_log_var, hit_temper))
        terms["hit"], ranked = hit, ranked + hit
    if failure_weight:
        fail = failure_loss(logits.T, matched.T, txt_log_var)
        if failure_images:
            fail = 0.5 * (fail + failure_loss(logits, matched, img_log_var))
        terms["failure"], ranked = fail, ranked + failure_weight * fail
    kl = torch.cat([kl_to_standard_normal(img_mu, img_log_var),
                    kl_to_standard_normal(txt_mu, txt_log_var)]).mean()
    gaussians = (img_mu, img_log_var, txt_mu, txt_log_var)
    if not pcme_weight:
        gaussians = tuple(t.detach() for t in gaussians)
    match = pcme_loss(*gaussians, matched, a, b, n_samples, kl_weight=0.0, generator=generator,
                      balanced=balanced)
    return {"loss": ranked + kl_weight * kl + (pcme_weight or 1.0) * match["nll"], "nce": nce,
            "kl": kl, "match_nll": match["nll"], "pos_prob": match["pos_prob"],
            "neg_prob": match["neg_prob"], **terms}
