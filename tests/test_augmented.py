"""Exact CSD / W2 search through augmented vectors equals a float64 brute force, alone and
through build_index + the engine."""
import numpy as np
import pytest

from engine.batch import BatchSearcher
from core.errors import PcmeError
from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
from indexer import augmented as aug
from indexer.build import build_index
from indexer.reader import IndexReader
from indexer.store import stored_log_var

D = 12


def brute(score, mu_q, lv_q, mu, lv):
    """[Q, N] raw score in float64, straight from the DESIGN.md definitions."""
    mu_q, lv_q, mu, lv = (x.astype(np.float64) for x in (mu_q, lv_q, mu, lv))
    sq = ((mu_q[:, None] - mu[None]) ** 2).sum(-1)
    if score == "csd":
        return sq + np.exp(lv_q).sum(-1)[:, None] + np.exp(lv).sum(-1)[None]
    d_sigma = np.exp(0.5 * lv_q)[:, None] - np.exp(0.5 * lv)[None]
    return sq + (d_sigma ** 2).sum(-1)


@pytest.mark.parametrize("score", aug.AUGMENTED_SCORES)
def test_augmented_flat_equals_brute_force(score):
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((500, D)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    lv = rng.normal(-2, 1, (500, D)).astype(np.float32)   # wide: σ really changes the ranking
    mu_q, lv_q = mu[:20] + 0.1, rng.normal(-2, 1, (20, D)).astype(np.float32)
    index = aug.make_index(score, D)
    index.add(aug.item_vectors(score, mu, lv))
    ids, raw = aug.search(index, score, mu_q, lv_q, 10)
    ref = brute(score, mu_q, lv_q, mu, stored_log_var(lv))
    want = np.sort(ref, axis=1)[:, :10]
    np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), want, rtol=1e-4, atol=1e-4)
    mu_only = np.argsort(-(mu_q @ mu.T), axis=1)[:, :10]
    assert not np.array_equal(np.sort(mu_only, 1), np.sort(ids, 1))  # σ mattered


def test_build_with_augmented_indexes_matches_exact_engine(tmp_path):
    spec = SyntheticSpec(1500, D, n_queries=15, n_centres=10, lv_mean=-2.0, lv_spread=1.0)
    shards = write_synthetic_shards(spec, tmp_path / "shards")
    manifest = build_index(shards, tmp_path / "index", factory="Flat", augmented=("csd", "w2"))
    assert manifest["augmented"]["image"] == ["csd", "w2"]
    assert (tmp_path / "index" / "image.w2.faiss").is_file()
    with IndexReader.open(tmp_path / "index") as r:
        _, mu_q, lv_q = r.all_vectors("text")
        searcher = BatchSearcher(r, 5.0, 5.0)
        for score in ("csd", "w2"):
            assert r.augmented("image", score) is not None
            got = searcher.search("image", mu_q, lv_q, 10, score)
            exact = searcher.search("image", mu_q, lv_q, 10, score, exact=True)
            assert got.shortlist.max() == 10 and "fetch_ms" not in got.timings_ms
            np.testing.assert_allclose(got.keys, exact.keys, rtol=1e-4, atol=1e-4)


def test_augmented_rejects_other_scores(tmp_path):
    with pytest.raises(PcmeError, match="only csd, w2"):
        aug.check_scores(["elk"])
