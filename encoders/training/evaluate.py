"""Evaluation of a trained model on a split against its ground truth.

Ground truth is the split's exact plausible-match matrix when the dataset has one (scenes: a caption
matches every image its predicate holds for), else the one-to-one pairing. Every score ranks the full
caption x image matrix; text->image uses it as is, image->text its transpose.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from core.served_mc import MC_SAMPLES, fixed_match_prob
from core.pairwise import pairwise
from core.scores import DEFAULT_SCORE, rank_key

from encoders.training.data.base import Split
from encoders.model.encode import encode_images, encode_texts
from encoders.training.metrics import pmrp_coco, retrieval_report
from encoders.model.networks import PCME
from core.charts import bar_chart
from core.progress import track
from encoders.model.open_vocab import OpenVocab
from encoders.model.text import Vocab
from encoders.training.uncertainty import uncertainty_report

logger = logging.getLogger(__name__)

DEFAULT_SCORES = ("mu", "elk", "csd", "mc")  # scored after training (see DEFAULT_SCORE)


def encode_split(model: PCME, vocab: Vocab, split: Split, device: torch.device):
    """-> (image μ, image log_var, caption μ, caption log_var) as float32 numpy arrays."""
    with track(f"encode {split.name} images", split.n_images) as bar:
        img = encode_images(model, split.load_image, split.n_images, device, progress=bar.advance)
    with track(f"encode {split.name} captions", split.n_captions) as bar:
        txt = encode_texts(model, vocab, split.captions, device, progress=bar.advance)
    return (*img, *txt)


MC_CHUNK = 64  # caption queries per mc call: every call samples all images again (16 per call
               # took 1.3-1.6x as long for 400 captions x 1,000 images)


def score_matrix(name: str, txt, img, a: float, b: float, n_samples: int = MC_SAMPLES):
    """[n_captions, n_images] matrix where higher = better, for any score of core.scores.
    mc uses the serving noise (core.served_mc.fixed_match_prob, images keyed by their id =
    row), so its text→image ranking is exactly what `query --score mc` serves; image→text
    reads the same matrix transposed."""
    if name == "mc":
        (t_mu, t_lv), (i_mu, i_lv) = txt, img
        ids = np.arange(len(i_mu))
        return np.concatenate([fixed_match_prob(t_mu[s:s + MC_CHUNK], t_lv[s:s + MC_CHUNK], i_mu,
                                                i_lv, ids, a, b, n_samples)
                               for s in range(0, len(t_mu), MC_CHUNK)])
    t_mu, t_lv = (torch.from_numpy(x) for x in txt)
    i_mu, i_lv = (torch.from_numpy(x) for x in img)
    return rank_key(name, pairwise(name, t_mu, t_lv, i_mu, i_lv)).numpy()


def score_report(split: Split, gt: np.ndarray, matrix: np.ndarray,
                 i2t_matrix: np.ndarray | None = None) -> dict:
    """Retrieval metrics of one [n_captions, n_images] score matrix (image→text from i2t_matrix
    when given: captions scored as items, `matrix` as queries). COCO replaces PMRP by the
    paper's plausible-match R-precision from category multi-hots (Hamming ≤ ζ, ζ ∈ {0,1,2})."""
    i2t_matrix = matrix if i2t_matrix is None else i2t_matrix
    report = retrieval_report(matrix, gt, score_i2t=i2t_matrix)
    multi_hot = getattr(split, "multi_hot_images", None)
    if multi_hot is not None:
        caps = split.multi_hot_captions
        report["t2i"]["PMRP"] = pmrp_coco(matrix, caps, multi_hot)
        report["i2t"]["PMRP"] = pmrp_coco(i2t_matrix.T, multi_hot, caps)
    return report


def ground_truth(split: Split) -> np.ndarray:
    gt = split.match_matrix()
    return gt if gt is not None else split.pairing_matrix()


def query_captions(model: PCME, vocab: Vocab, split: Split, device: torch.device):
    """The captions encoded as text queries (TextEncoder.forward's `query`: the open-word
    uncertainty), or None where that cannot differ from encode_split's (a closed vocabulary)."""
    if not isinstance(vocab, OpenVocab):
        return None
    return encode_texts(model, vocab, split.captions, device, query=True)


def evaluate_split(model: PCME, vocab: Vocab, split: Split, device: torch.device,
                   scores=DEFAULT_SCORES, embeddings=None, queries=None) -> dict:
    """The eval JSON: {"split", "n_images", "n_captions", "by_score": {score: report},
    "uncertainty": {"score", "spearman_caption_var_vs_matches", "bins"}}. `queries`: the
    captions as text queries (query_captions) for text→image; image→text always ranks the
    captions as items (encode_split's)."""
    i_mu, i_lv, t_mu, t_lv = embeddings or encode_split(model, vocab, split, device)
    q_mu, q_lv = queries if queries is not None else (t_mu, t_lv)
    gt = ground_truth(split)
    a, b = model.a.item(), model.b.item()
    # the uncertainty of each direction is judged under the score its queries get by default
    t2i_score, i2t_score = (DEFAULT_SCORE[m] if DEFAULT_SCORE[m] in scores else scores[0]
                            for m in ("text", "image"))
    by_score, unc, unc_i2t = {}, None, None
    for name in scores:
        items = score_matrix(name, (t_mu, t_lv), (i_mu, i_lv), a, b)
        matrix = items if queries is None else score_matrix(name, (q_mu, q_lv), (i_mu, i_lv), a, b)
        rep = by_score[name] = score_report(split, gt, matrix, items)
        logger.info("%s: t2i R@1 %.3f PMRP %.3f | i2t R@1 %.3f PMRP %.3f | rsum %.1f", name,
                    rep["t2i"]["R@1"], rep["t2i"]["PMRP"], rep["i2t"]["R@1"], rep["i2t"]["PMRP"],
                    rep["rsum"])
        if name == t2i_score:
            unc = uncertainty_report(q_lv, matrix, gt, groups=getattr(split, "caption_levels", None))
        if name == i2t_score:
            unc_i2t = uncertainty_report(i_lv, items.T, gt.T,
                                         spearman_key="spearman_image_var_vs_matches")
    logger.info("Spearman(caption Σσ², true matches) = %.3f; AUROC(caption Σσ², t2i failure) = "
                "%.3f", unc["spearman_caption_var_vs_matches"], unc["auroc_failure"])
    return {"split": split.name, "dataset": split.dataset, "n_images": split.n_images,
            "n_captions": split.n_captions, "match_a": a, "match_b": b, "by_score": by_score,
            "uncertainty": {"score": t2i_score, **unc},
            "uncertainty_i2t": {"score": i2t_score, **unc_i2t}}


def plot_uncertainty(report: dict, path) -> None:
    """--plot: R@1 of text→image queries per caption-uncertainty bin (low → high Σσ²)."""
    unc = report["uncertainty"]
    bar_chart([b["R@1"] for b in unc["bins"]], [str(b["bin"]) for b in unc["bins"]],
              f"t2i R@1 per caption Σσ² bin, low -> high ({unc['score']}; Spearman "
              f"{unc['spearman_caption_var_vs_matches']:.2f})", path)
