import numpy as np
import pytest

from encoders.training.uncertainty import (average_ranks, recall_by_uncertainty, spearman, top1_hits,
                                  uncertainty_report)
from core.errors import PcmeError


def test_spearman_hand_computed_without_ties():
    # 1 - 6 Σd² / (n(n²-1)) with d = (0, 1, 1, 0): 1 - 12/60 = 0.8
    assert spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(np.array([1, 2, 3]), np.array([30, 20, 10])) == pytest.approx(-1.0)


def test_average_ranks_and_spearman_with_ties():
    np.testing.assert_allclose(average_ranks(np.array([10, 20, 10, 30])), [1.5, 3, 1.5, 4])
    x, y = np.array([1, 1, 2, 3]), np.array([1, 2, 3, 3])
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.array([1, 2, 3.5, 3.5])
    expected = np.corrcoef(rx, ry)[0, 1]  # Pearson on average ranks, by hand
    assert spearman(x, y) == pytest.approx(expected)


def test_recall_by_uncertainty_bins_low_to_high():
    var = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    hit = np.array([False, True, False, True, True, False])
    bins = recall_by_uncertainty(var, hit, n_bins=3)
    assert [b["R@1"] for b in bins] == [1.0, 0.5, 0.0]
    assert [(b["var_lo"], b["var_hi"], b["n"]) for b in bins] == [(1, 2, 2), (3, 4, 2), (5, 6, 2)]
    with pytest.raises(PcmeError):
        recall_by_uncertainty(var, hit, n_bins=7)


def test_report_on_a_constructed_run():
    gt = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # caption 1 matches all
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.8, 0.1, 0.0]])
    np.testing.assert_array_equal(top1_hits(scores, gt), [True, True, False])
    log_var = np.log(np.array([[0.1, 0.1], [1.0, 1.0], [0.2, 0.2]]))
    rep = uncertainty_report(log_var, scores, gt, n_bins=3)
    assert rep["spearman_caption_var_vs_matches"] == pytest.approx(spearman([0.2, 2.0, 0.4], [1, 3, 1]))
    assert [b["R@1"] for b in rep["bins"]] == [1.0, 0.0, 1.0]


def test_report_by_group_hand_computed():
    gt = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.2, 0.3, 0.1, 0.0], [0.1, 0.8, 0.0, 0.0]])
    log_var = np.log(np.array([[0.5, 0.5], [0.1, 0.3], [0.2, 0.2]]))
    rep = uncertainty_report(log_var, scores, gt, n_bins=1, groups=["setting", "pair", "pair"])
    assert rep["by_group"] == [
        {"group": "setting", "n": 1, "mean_matches": 3.0, "mean_var": pytest.approx(1.0), "R@1": 1.0},
        {"group": "pair", "n": 2, "mean_matches": 1.0, "mean_var": pytest.approx(0.4), "R@1": 0.5}]
    assert "by_group" not in uncertainty_report(log_var, scores, gt, n_bins=1)
    with pytest.raises(PcmeError, match="2 group labels for 3 captions"):
        uncertainty_report(log_var, scores, gt, n_bins=1, groups=["a", "b"])
