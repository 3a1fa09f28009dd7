"""Retrieval metrics against hand-computed values and a plain Python reference."""
import numpy as np
import pytest

from encoders.training.metrics import (map_at_r, pmrp_coco, r_precision, recall_at_k,
                              retrieval_report)
from core.errors import PcmeError


# ---------------------------------------------------------------------------- reference

def _ranking(row):
    """Tie rule written out: descending score, then ascending item index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def _ref_metrics(scores, gt, ks=(1, 5, 10)):
    recall, r_prec, ap = {k: [] for k in ks}, [], []
    for row, truth in zip(scores.tolist(), gt.tolist()):
        n_true = sum(truth)
        if n_true == 0:
            continue
        rel = [truth[j] for j in _ranking(row)]
        for k in ks:
            recall[k].append(any(rel[:k]))
        r_prec.append(sum(rel[:n_true]) / n_true)
        precisions = [sum(rel[:i + 1]) / (i + 1) for i in range(n_true) if rel[i]]
        ap.append(sum(precisions) / n_true)
    return ({k: float(np.mean(v)) for k, v in recall.items()}, float(np.mean(r_prec)),
            float(np.mean(ap)))


def _random_case(n_q, n_items, seed, ties=False, density=0.1):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n_q, n_items)).astype(np.float32)
    if ties:  # a handful of distinct values: many ties per row
        scores = np.round(scores * 2) / 2
    gt = rng.random((n_q, n_items)) < density
    return scores, gt


# ---------------------------------------------------------------------------- hand-made

def test_hand_made_rankings_with_ties():
    scores = np.array([
        [0.9, 0.5, 0.5, 0.1],    # ranking 0,1,2,3 (tie 1/2 by index); true item 2 at rank 3
        [0.2, 0.8, 0.8, 0.8],    # ranking 1,2,3,0; true 3 and 0 at ranks 3 and 4
        [0.7, 0.7, 0.7, 0.7],    # all tied: ranking 0,1,2,3; true 0 at rank 1
    ])
    gt = np.array([
        [False, False, True, False],
        [True, False, False, True],
        [True, False, False, False],
    ])
    assert recall_at_k(scores, gt, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1.0})
    # R-precision: row0 R=1 top1={0} -> 0; row1 R=2 top2={1,2} -> 0; row2 R=1 -> 1
    assert r_precision(scores, gt) == pytest.approx(1 / 3)
    # MAP@R: row0 0; row1 0 (no hit in top 2); row2 1
    assert map_at_r(scores, gt) == pytest.approx(1 / 3)


def test_many_true_matches_and_r_larger_than_k():
    # 6 items, 4 true: ranking 0..5 by score; true items at ranks 1, 3, 4, 6
    scores = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    gt = np.array([[True, False, True, True, False, True]])
    assert recall_at_k(scores, gt, ks=(1, 2)) == {1: 1.0, 2: 1.0}
    assert r_precision(scores, gt) == pytest.approx(3 / 4)         # top 4 holds 3 true
    assert map_at_r(scores, gt) == pytest.approx((1 + 2 / 3 + 3 / 4) / 4)
    # a query whose first hit is beyond k
    later = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    late_gt = np.array([[False, False, False, True, True, False]])
    assert recall_at_k(later, late_gt, ks=(1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    assert map_at_r(later, late_gt) == 0.0


def test_queries_without_true_items_are_skipped():
    scores, gt = _random_case(10, 30, seed=1, density=0.2)
    gt[[2, 7]] = False
    kept = np.ones(10, dtype=bool)
    kept[[2, 7]] = False
    assert r_precision(scores, gt) == pytest.approx(r_precision(scores[kept], gt[kept]))
    report = retrieval_report(scores, gt)
    assert report["t2i"]["n_skipped"] == 2
    with pytest.raises(PcmeError, match="no query"):
        recall_at_k(scores, np.zeros_like(gt))


# ---------------------------------------------------------------------------- vs reference

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [2, 3])
def test_random_matrices_match_python_reference(ties, seed):
    scores, gt = _random_case(40, 60, seed=seed, ties=ties)
    gt[:, 0] |= ~gt.any(axis=1)  # every query has at least one true item
    recall, r_prec, ap = _ref_metrics(scores, gt)
    assert recall_at_k(scores, gt) == pytest.approx(recall)
    assert r_precision(scores, gt) == pytest.approx(r_prec)
    assert map_at_r(scores, gt) == pytest.approx(ap)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_unchunked(chunk):
    scores, gt = _random_case(50, 40, seed=4, ties=True, density=0.15)
    for fn in (r_precision, map_at_r):
        assert fn(scores, gt, chunk=chunk) == fn(scores, gt)
    assert recall_at_k(scores, gt, chunk=chunk) == recall_at_k(scores, gt)
    assert retrieval_report(scores, gt, chunk=chunk) == retrieval_report(scores, gt)


def test_retrieval_report_both_directions():
    # 5 images, 2 captions each: caption c belongs to image c // 2
    rng = np.random.default_rng(5)
    gt = np.zeros((10, 5), dtype=bool)
    gt[np.arange(10), np.arange(10) // 2] = True
    scores = rng.standard_normal((10, 5)) + 1.5 * gt
    report = retrieval_report(scores, gt)
    for direction, (s, g) in {"t2i": (scores, gt), "i2t": (scores.T, gt.T)}.items():
        recall, r_prec, ap = _ref_metrics(s, g)
        expected = {"R@1": recall[1], "R@5": recall[5], "R@10": recall[10], "PMRP": r_prec,
                    "mAP@R": ap}
        assert report[direction] == pytest.approx(expected)
    six = [report[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert report["rsum"] == pytest.approx(100 * sum(six))


def test_pmrp_coco_matches_reference():
    rng = np.random.default_rng(6)
    mh_q = rng.random((30, 8)) < 0.3
    mh_d = rng.random((25, 8)) < 0.3
    scores = rng.standard_normal((30, 25))
    per_zeta = []
    for zeta in (0, 1, 2):
        hamming = (mh_q[:, None, :] != mh_d[None, :, :]).sum(-1)
        gt = hamming <= zeta
        keep = gt.any(axis=1)
        per_zeta.append(_ref_metrics(scores[keep], gt[keep])[1])
    assert pmrp_coco(scores, mh_q, mh_d) == pytest.approx(np.mean(per_zeta))
    assert pmrp_coco(scores, mh_q, mh_d, chunk=4) == pmrp_coco(scores, mh_q, mh_d)


# ---------------------------------------------------------------------------- errors

def test_bad_inputs_raise():
    scores, gt = _random_case(4, 5, seed=7)
    with pytest.raises(PcmeError, match="shape"):
        r_precision(scores, gt[:, :4])
    with pytest.raises(PcmeError, match="boolean"):
        map_at_r(scores, gt.astype(int))
    with pytest.raises(PcmeError, match="ks"):
        recall_at_k(scores, gt, ks=(0,))
    scores[1, 2] = np.nan
    with pytest.raises(PcmeError, match="NaN"):
        r_precision(scores, gt | True)
    with pytest.raises(PcmeError, match="multi-hot"):
        pmrp_coco(scores, np.ones((4, 3)), np.ones((5, 4)))


def test_a_report_ranks_images_for_queries_and_captions_as_items_from_two_matrices():
    """retrieval_report(score_t2i, gt, score_i2t=...): text→image from the first matrix,
    image→text from the second (captions encoded as items: the open-word term acts on queries
    only), each as the reference computes it; rsum sums both."""
    queries, gt = _random_case(30, 12, seed=3, density=0.15)
    items, _ = _random_case(30, 12, seed=4)
    report = retrieval_report(queries, gt, score_i2t=items)
    t2i_ref, _, _ = _ref_metrics(queries, gt)
    i2t_ref, _, _ = _ref_metrics(items.T, gt.T)
    assert t2i_ref != _ref_metrics(items, gt)[0]   # the two matrices rank differently
    assert {k: report["t2i"][f"R@{k}"] for k in (1, 5, 10)} == pytest.approx(t2i_ref)
    assert {k: report["i2t"][f"R@{k}"] for k in (1, 5, 10)} == pytest.approx(i2t_ref)
    assert report["rsum"] == pytest.approx(100 * (sum(t2i_ref.values()) + sum(i2t_ref.values())))
    with pytest.raises(PcmeError, match="gt shape"):
        retrieval_report(queries, gt, score_i2t=items[:, :5])
