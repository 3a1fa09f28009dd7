"""What a user is told about trusting a result: AUROC and risk-coverage of σ (eval), the
calibration an index carries, and a query's confidence and per-hit p_match (engine)."""
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app, open_engine
from core.montecarlo import match_prob
from core.served_mc import MC_SAMPLES, item_noise
from encoders.training.uncertainty import auroc, risk_coverage, uncertainty_report
from engine.confidence import Calibration
from indexer.reader import IndexReader


def test_auroc_equals_counting_all_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)     # many ties
    positive = rng.random(40) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[positive], scores[~positive])]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(scores, positive) == pytest.approx(expected)
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([False, False, True])) == 1.0
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))


def test_risk_coverage_keeps_the_least_uncertain_queries():
    var = np.array([0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 1.0])
    hits = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0], bool)
    curve = {c["coverage"]: (c["R@1"], c["n"]) for c in risk_coverage(var, hits)}
    # sorted by var: hits 1(0.1) 1(0.2) 1(0.3) 0(0.4) 1(0.5) 0(0.6) 1(0.7) 0(0.8) 0(0.9) 0(1.0)
    assert curve[1.0] == (0.5, 10)
    assert curve[0.5] == (0.8, 5)
    assert curve[0.3] == (1.0, 3)
    assert curve[0.1] == (1.0, 1)


def test_uncertainty_report_failure_auroc_on_a_hand_made_case():
    # 4 caption queries over 2 images; the two with large σ get their top-1 wrong
    gt = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], bool)
    scores = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3]])
    log_var = np.log(np.array([[0.1], [0.2], [0.5], [0.6]]))
    rep = uncertainty_report(log_var, scores, gt, n_bins=2)
    assert rep["auroc_failure"] == 1.0
    assert [c["R@1"] for c in rep["risk_coverage"] if c["coverage"] in (1.0, 0.5)] == [0.5, 1.0]


def test_calibration_interpolates_between_decile_means():
    manifest = {"calibration": {"text": {"bins": [
        {"var_mean": 0.1, "R@1": 0.9}, {"var_mean": 0.3, "R@1": 0.5}, {"var_mean": 0.2, "R@1": 0.7}]}}}
    cal = Calibration.from_manifest(manifest, "text")
    assert cal.expected_r1(0.15) == pytest.approx(0.8)
    assert cal.expected_r1(0.0) == pytest.approx(0.9)     # clamped at the ends
    assert cal.expected_r1(1.0) == pytest.approx(0.5)
    assert Calibration.from_manifest(manifest, "image") is None


def test_query_reports_p_match_and_confidence_from_the_index(trained):
    """p_match equals an independent Monte-Carlo evaluation with the same noise, and the
    confidence equals the manifest's table read at the query's Σσ²."""
    with open_engine(trained / "index") as eng:
        result = eng.query_text("a red car", k=3)
        mu_q, lv_q, _ = eng.encoder.encode_text("a red car")
        a, b = eng.batch.a, eng.batch.b
        cal = Calibration.from_manifest(eng.reader.manifest, "text")
    ids = np.array([h.id for h in result.results])
    with IndexReader.open(trained / "index") as reader:
        mu_d, lv_d = reader.fetch("image", ids)
    eps_q, eps_d = item_noise(ids, MC_SAMPLES, mu_d.shape[1])
    t = lambda x: torch.from_numpy(np.asarray(x, np.float32))
    expected = match_prob(t(mu_q), t(lv_q), t(mu_d), t(lv_d), a, b, MC_SAMPLES,
                          eps_q=t(eps_q[:, 0]), eps_d=t(eps_d))
    np.testing.assert_allclose([h.p_match for h in result.results], expected.numpy(), rtol=1e-4)
    assert all(0.0 <= h.p_match <= 1.0 for h in result.results)
    assert cal is not None  # train wrote eval.json for this checkpoint; index copied its table
    total_var = float(np.exp(lv_q.astype(np.float64)).sum())
    assert result.query_uncertainty == pytest.approx(total_var)
    assert result.confidence == pytest.approx(cal.expected_r1(total_var))
    assert result.low_confidence == (result.confidence < 0.5)


def test_index_gets_no_calibration_from_another_checkpoints_eval(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    shutil.copytree(trained / "out", tmp_path / "out")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["producer"]["checkpoint"] = str(run / "checkpoint.pt")
    manifest_path.write_text(json.dumps(manifest))
    report = json.loads((run / "eval.json").read_text())
    report["checkpoint_sha256"] = "0" * 64
    (run / "eval.json").write_text(json.dumps(report))
    res = CliRunner().invoke(app, ["index", "--shards", str(tmp_path / "out"), "--out",
                                   str(tmp_path / "index")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["calibration"] == {}


def test_eval_mc_is_the_mc_that_queries_get(trained):
    """eval's mc matrix (text→image) and the engine's exhaustive mc give the same numbers for
    the same vectors: one sample count, one noise, one kernel."""
    from core.served_mc import MC_SAMPLES as served
    from encoders.training.evaluate import score_matrix

    with open_engine(trained / "index") as eng:
        _, i_mu, i_lv = eng.reader.all_vectors("image")
        _, t_mu, t_lv = eng.reader.all_vectors("text")
        a, b = eng.batch.a, eng.batch.b
        assert eng.batch.mc_samples == served == eng.reader.manifest["mc_samples"]
        ids, keys = eng.batch.exact("image").topk("mc", t_mu[:4], t_lv[:4], 5, a, b)
    matrix = score_matrix("mc", (t_mu[:4], t_lv[:4]), (i_mu, i_lv), a, b)
    np.testing.assert_allclose(np.take_along_axis(matrix, ids, axis=1), keys, rtol=1e-5)
