"""The other losses `--loss` can pick, beside PCME's, and the one registry that calls them all.

    pcmepp   PCME++ (Chun, ICLR 2024): closed-form sampled distance, BCE, pseudo-positives, KL
    infonce  deterministic μ-only baseline: symmetric InfoNCE over ⟨μ_i, μ_t⟩
    vse++    deterministic μ-only baseline: triplet loss with the hardest in-batch negatives

All take img_mu, img_log_var [B_img, D], txt_mu, txt_log_var [B_txt, D] and matched
[B_img, B_txt] bool (an image may have several captions in the batch) and return a dict with
"loss" plus detached-or-scalar values worth logging. μ-only losses leave log_var without a
gradient: the σ heads of such a model are untrained and only its "mu" score is meaningful.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from core.errors import PcmeError

from encoders.training.losses import kl_to_standard_normal, pcme_loss

logger = logging.getLogger(__name__)


def _check(img_mu, txt_mu, matched, where: str) -> None:
    if img_mu.dim() != 2 or txt_mu.dim() != 2 or img_mu.shape[1] != txt_mu.shape[1]:
        raise PcmeError(f"{where}: embeddings must be [B, D] with the same D, got "
                        f"{tuple(img_mu.shape)} and {tuple(txt_mu.shape)}")
    expected = (img_mu.shape[0], txt_mu.shape[0])
    if tuple(matched.shape) != expected or matched.dtype != torch.bool:
        raise PcmeError(f"{where}: matched must be a bool tensor of shape {expected}, got "
                        f"{matched.dtype} {tuple(matched.shape)}")


def _check_log_var(mu, log_var, where: str) -> None:
    if mu.shape != log_var.shape:
        raise PcmeError(f"{where}: mu {tuple(mu.shape)} and log_var {tuple(log_var.shape)} "
                        f"differ in shape")


# ------------------------------------------------------------------------------------ PCME++

def pairwise_csd(img_mu, img_log_var, txt_mu, txt_log_var) -> torch.Tensor:
    """[B_img, B_txt] closed-form sampled distance ‖μ_i−μ_t‖² + Σv_i + Σv_t, v = exp(log_var):
    the expected squared distance between a sample of each, in closed form."""
    return (pairwise_sq_dist(img_mu, txt_mu) + img_log_var.exp().sum(-1)[:, None]
            + txt_log_var.exp().sum(-1)[None, :])


def pairwise_sq_dist(img_mu, txt_mu) -> torch.Tensor:
    """[B_img, B_txt] ‖μ_i−μ_t‖²."""
    # ‖x−y‖² = ‖x‖² + ‖y‖² − 2⟨x, y⟩: one matmul instead of a [B_img, B_txt, D] difference
    # tensor (a third of a training step's time at 128 × 640 × 128, forward and backward)
    return ((img_mu ** 2).sum(-1)[:, None] + (txt_mu ** 2).sum(-1)[None, :]
            - 2.0 * img_mu @ txt_mu.T).clamp_min(0.0)


def pseudo_positives(csd: torch.Tensor, matched: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) bool [B_img, B_txt]: the pseudo-positives of each direction, as in PCME++.

    Image→text (rows): for each image, the unmatched captions at least as close (CSD ≤) as its
    ground-truth caption, the first matched one; text→image (cols): for each caption, the
    unmatched images at least as close as its ground-truth image. Anchors without a positive
    select none. Each direction relabels its own pseudo-positives, separately.
    """
    def one_side(d, m):  # rows of d are anchors
        first = m.to(torch.uint8).argmax(dim=1, keepdim=True)      # first positive of the row
        ref = d.gather(1, first)
        return ~m & (d <= ref) & m.any(dim=1, keepdim=True)
    return one_side(csd, matched), one_side(csd.T, matched.T).T


def _bce(logits: torch.Tensor, labels: torch.Tensor, balanced: bool = True) -> torch.Tensor:
    """BCE with logits: mean over positive pairs + mean over negative pairs (balanced: the B²−B
    negatives would otherwise drown the B positives; an empty group contributes 0), or the
    plain mean over all pairs (balanced=False: every pair weighs the same, as PCME++ does)."""
    if not balanced:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    zero = logits.new_zeros(())
    pos = F.softplus(-logits[labels]).mean() if labels.any() else zero
    neg = F.softplus(logits[~labels]).mean() if (~labels).any() else zero
    return pos + neg


def pcmepp_loss(img_mu, img_log_var, txt_mu, txt_log_var, matched: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, pseudo_weight: float = 0.1,
                kl_weight: float = 1e-4, balanced: bool = True) -> dict:
    """PCME++: p(match) = sigmoid(−a·CSD + b), trained with BCE.

    loss = bce(matched) + pseudo_weight·½[bce(matched | rows) + bce(matched | cols)] +
    kl_weight·kl: each direction relabels its pseudo-positives (see pseudo_positives) as
    matches, as PCME++ does to soften the false negatives of captioned datasets. `balanced`
    chooses the pair weighting of every BCE term (see _bce). `a` > 0 and `b` are scalar
    tensors (learnable). Returns {"loss", "bce", "pseudo_bce", "kl", "n_pseudo", "pos_prob",
    "neg_prob"}.
    """
    _check(img_mu, txt_mu, matched, "pcmepp_loss")
    _check_log_var(img_mu, img_log_var, "pcmepp_loss: image")
    _check_log_var(txt_mu, txt_log_var, "pcmepp_loss: text")
    csd = pairwise_csd(img_mu, img_log_var, txt_mu, txt_log_var)
    logits = -a * csd + b
    rows, cols = pseudo_positives(csd.detach(), matched)
    bce = _bce(logits, matched, balanced)
    pseudo_bce = 0.5 * (_bce(logits, matched | rows, balanced) + _bce(logits, matched | cols, balanced))
    kl = torch.cat([kl_to_standard_normal(img_mu, img_log_var),
                    kl_to_standard_normal(txt_mu, txt_log_var)]).mean()
    prob = torch.sigmoid(logits.detach())
    nan = prob.new_tensor(float("nan"))
    return {
        "loss": bce + pseudo_weight * pseudo_bce + kl_weight * kl,
        "bce": bce, "pseudo_bce": pseudo_bce, "kl": kl,
        "n_pseudo": rows.sum() + cols.sum(),
        "pos_prob": prob[matched].mean() if matched.any() else nan,
        "neg_prob": prob[~matched].mean() if (~matched).any() else nan,
    }


# ------------------------------------------------------------------------------------ InfoNCE

def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows with a positive of −(mean over the row's positives of log softmax).

    Each positive is a separate target of the row's softmax (SupCon's "L_out"): with several
    captions of one image in the batch, the image is pulled towards all of them equally.
    `weights` (same shape, ≥ 0): a weighted mean over the row's positives instead.
    """
    log_prob = F.log_softmax(logits, dim=1)
    w = positives.to(log_prob.dtype) if weights is None else torch.where(positives, weights, 0.0)
    n_pos = w.sum(dim=1)
    rows = n_pos > 0
    per_row = (w * torch.where(positives, log_prob, 0.0)).sum(dim=1)[rows] / n_pos[rows]
    return -per_row.mean()


def pair_mask(n_img: int, per: int, device=None) -> torch.Tensor:
    """bool [n_img, n_img·per]: the batch layout, `per` captions written for each image, in
    image order (caption j belongs to image j // per)."""
    eye = torch.eye(n_img, dtype=torch.bool, device=device)
    return eye.repeat_interleave(per, dim=1)


def own_pairs(matched: torch.Tensor) -> torch.Tensor:
    """bool [B_img, B_txt]: caption j written for image i, read off a positives matrix of the
    batch layout (pair_mask)."""
    n_img, n_txt = matched.shape
    per = n_txt // n_img
    if per * n_img != n_txt:
        raise PcmeError(f"own_pairs: {n_txt} captions do not split evenly over {n_img} images")
    return pair_mask(n_img, per, matched.device)


def infonce_loss(img_mu, txt_mu, matched: torch.Tensor, logit_scale) -> dict:
    """Symmetric InfoNCE: cross-entropy of logits = logit_scale·⟨μ_i, μ_t⟩ (logit_scale = 1/τ,
    a float or a positive scalar tensor that may be learnable), image→text over each image's
    row, text→image over each caption's column, averaged. Several positives per row: see
    _multi_positive_ce. Returns {"loss", "i2t", "t2i", "pos_sim", "neg_sim"}."""
    _check(img_mu, txt_mu, matched, "infonce_loss")
    sim = img_mu @ txt_mu.T
    i2t = _multi_positive_ce(logit_scale * sim, matched)
    t2i = _multi_positive_ce(logit_scale * sim.T, matched.T)
    sim = sim.detach()
    nan = sim.new_tensor(float("nan"))
    return {"loss": 0.5 * (i2t + t2i), "i2t": i2t, "t2i": t2i,
            "pos_sim": sim[matched].mean() if matched.any() else nan,
            "neg_sim": sim[~matched].mean() if (~matched).any() else nan}


# ------------------------------------------------------------------------------------ VSE++

def vsepp_loss(img_mu, txt_mu, matched: torch.Tensor, margin: float = 0.2) -> dict:
    """VSE++ (Faghri et al. 2018): for every matched pair (i, t), hinge on the hardest
    negative of each side: [m − s(i,t) + max_{t' ∉ pos(i)} s(i,t')]₊ +
    [m − s(i,t) + max_{i' ∉ pos(t)} s(i',t)]₊, s = ⟨μ_i, μ_t⟩; averaged over matched pairs
    (VSE++ sums; the mean keeps the scale independent of the batch size). An anchor without
    negatives contributes 0. Returns {"loss", "i2t", "t2i", "hard_neg_sim"}."""
    _check(img_mu, txt_mu, matched, "vsepp_loss")
    if not matched.any():
        raise PcmeError("vsepp_loss: the batch has no matched pair")
    sim = img_mu @ txt_mu.T
    negatives = torch.where(matched, float("-inf"), sim)
    hard_for_img = negatives.amax(dim=1, keepdim=True)  # [B_img, 1]: hardest caption
    hard_for_txt = negatives.amax(dim=0, keepdim=True)  # [1, B_txt]: hardest image
    i2t = F.relu(margin - sim + hard_for_img)[matched].mean()
    t2i = F.relu(margin - sim + hard_for_txt)[matched].mean()
    hard = torch.cat([hard_for_img.flatten(), hard_for_txt.flatten()]).detach()
    hard = hard[torch.isfinite(hard)]
    return {"loss": i2t + t2i, "i2t": i2t, "t2i": t2i,
            "hard_neg_sim": hard.mean() if hard.numel() else sim.new_tensor(float("nan"))}


# ------------------------------------------------------------------------------------ registry

LossFn = Callable[..., dict]


def _pcme(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, cfg, generator=None) -> dict:
    return pcme_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, n_samples=cfg.n_samples,
                     kl_weight=cfg.kl_weight, uniformity_weight=cfg.uniformity_weight,
                     generator=generator, balanced=cfg.balanced_pairs,
                     hard_negative_beta=cfg.hard_negative_beta if cfg.hard_negatives else None,
                     anchor_positives=cfg.anchor_positives)


def _pcmepp(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, cfg, generator=None) -> dict:
    return pcmepp_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b,
                       pseudo_weight=cfg.pseudo_weight, kl_weight=cfg.kl_weight,
                       balanced=cfg.balanced_pairs)


def _infonce(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, cfg, generator=None) -> dict:
    # A fixed temperature if the config gives one, else the model's learnable positive `a`
    # serves as the logit scale 1/τ (b is unused), so no model change is needed.
    scale = a if not cfg.temperature else 1.0 / float(cfg.temperature)
    return infonce_loss(img_mu, txt_mu, matched, scale)


def _prob_nce(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, cfg, generator=None) -> dict:
    from encoders.training.losses_nce import prob_nce_loss  # it builds on this module

    return prob_nce_loss(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, scale=cfg.nce_scale,
                         score=cfg.nce_score, kl_weight=cfg.kl_weight,
                         n_samples=cfg.n_samples if cfg.pcme_weight else cfg.calib_samples,
                         pcme_weight=cfg.pcme_weight, generator=generator,
                         balanced=cfg.balanced_pairs, temper=cfg.nce_temper, hit_temper=cfg.hit_temper,
                         failure_weight=cfg.failure_weight,
                         failure_images=cfg.failure_images, hit_captions=cfg.hit_captions,
                         plausible_weight=cfg.plausible_weight)


def _vsepp(img_mu, img_lv, txt_mu, txt_lv, matched, a, b, cfg, generator=None) -> dict:
    return vsepp_loss(img_mu, txt_mu, matched, margin=cfg.margin)


# The one loss factory: name -> fn(img_mu, img_log_var, txt_mu, txt_log_var, matched, a, b,
# cfg, generator=None) -> {"loss", ...}. `cfg` is the TrainConfig (encoders/training/config.py),
# which holds the only copy of every option's default.
LOSSES: dict[str, LossFn] = {"pcme": _pcme, "pcmepp": _pcmepp, "prob-nce": _prob_nce,
                             "infonce": _infonce, "vse++": _vsepp}
PROBABILISTIC = frozenset({"pcme", "pcmepp", "prob-nce"})  # losses that train log_var (σ heads)
