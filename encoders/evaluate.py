"""Evaluation of a trained model on a split against its ground truth.

Ground truth is the split's exact plausible-match matrix when the dataset has one (scenes: a caption
matches every image its predicate holds for), else the one-to-one pairing. Every score ranks the full
caption x image matrix; text->image uses it as is, image->text its transpose.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from engine.scores import pairwise, rank_key

from .data.base import Split
from .encode import encode_images, encode_texts
from .metrics import retrieval_report
from .models import PCME
from .progress import track
from .text import Vocab

logger = logging.getLogger(__name__)

DEFAULT_SCORES = ("mu", "elk")


def encode_split(model: PCME, vocab: Vocab, split: Split, device: torch.device):
    """-> (image μ, image log_var, caption μ, caption log_var) as float32 numpy arrays."""
    with track(f"encode {split.name} images", split.n_images) as bar:
        img = encode_images(model, split.load_image, split.n_images, device, progress=bar.advance)
    with track(f"encode {split.name} captions", split.n_captions) as bar:
        txt = encode_texts(model, vocab, split.captions, device, progress=bar.advance)
    return (*img, *txt)


def score_matrix(name: str, txt, img, a: float, b: float, n_samples: int = 8, seed: int = 0):
    """[n_captions, n_images] matrix where higher = better, for any score of engine.scores."""
    t_mu, t_lv = (torch.from_numpy(x) for x in txt)
    i_mu, i_lv = (torch.from_numpy(x) for x in img)
    kwargs = {}
    if name == "mc":
        kwargs = dict(a=a, b=b, n_samples=n_samples,
                      generator=torch.Generator().manual_seed(seed))
    raw = pairwise(name, t_mu, t_lv, i_mu, i_lv, **kwargs)
    return rank_key(name, raw).numpy()


def evaluate_embeddings(img, txt, gt: np.ndarray, scores=DEFAULT_SCORES, a: float = 5.0,
                        b: float = 5.0) -> dict:
    out = {}
    for name in scores:
        out[name] = retrieval_report(score_matrix(name, txt, img, a, b), gt)
        logger.info("%s: t2i R@1 %.3f PMRP %.3f | i2t R@1 %.3f PMRP %.3f | rsum %.1f", name,
                    out[name]["t2i"]["R@1"], out[name]["t2i"]["PMRP"], out[name]["i2t"]["R@1"],
                    out[name]["i2t"]["PMRP"], out[name]["rsum"])
    return out


def ground_truth(split: Split) -> np.ndarray:
    gt = split.match_matrix()
    return gt if gt is not None else split.pairing_matrix()


def evaluate_split(model: PCME, vocab: Vocab, split: Split, device: torch.device,
                   scores=DEFAULT_SCORES, embeddings=None) -> dict:
    """The eval JSON: {"split", "n_images", "n_captions", "by_score": {score: report}}."""
    i_mu, i_lv, t_mu, t_lv = embeddings or encode_split(model, vocab, split, device)
    by_score = evaluate_embeddings((i_mu, i_lv), (t_mu, t_lv), ground_truth(split), scores,
                                   a=model.a.item(), b=model.b.item())
    return {"split": split.name, "dataset": split.dataset, "n_images": split.n_images,
            "n_captions": split.n_captions, "by_score": by_score}
