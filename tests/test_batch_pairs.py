"""The batch path's pair-chunked rescoring (engine/batch.py): chunked keys equal one gathered
[Q, M, D] rescoring call, an empty batch answers with empty arrays, and a batch equals its
queries searched one by one."""
import numpy as np
import pytest

import engine.batch as batch_mod
from engine.batch import BatchSearcher
from engine.rescore import rescore_gathered
from indexer.reader import IndexReader

K = 5


@pytest.fixture(scope="module")
def reader(good):
    with IndexReader.open(good / "index") as r:
        yield r


@pytest.mark.parametrize("score", ("elk", "bhattacharyya", "csd", "w2"))
def test_chunked_pairs_equal_one_gathered_call(reader, score, monkeypatch):
    _, mu, lv = reader.all_vectors("image")
    monkeypatch.setattr(batch_mod, "CHUNK_FLOATS", 7 * mu.shape[1])  # many chunks, a ragged last
    _, mu_q, lv_q = reader.all_vectors("text")
    rng = np.random.default_rng(3)
    ids = rng.choice(len(mu), size=(4, 30), replace=True)   # repeats across queries: one union
    s = BatchSearcher(reader, 5.0, 5.0)
    timings = {"fetch_ms": 0.0, "rescore_ms": 0.0}
    got = s._rescore("image", score, mu_q[:4], lv_q[:4], ids, timings)
    want = rescore_gathered(score, mu_q[:4], lv_q[:4], mu[ids], lv[ids], ids, 5.0, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_empty_batch(reader):
    res = BatchSearcher(reader, 5.0, 5.0).search("image", np.zeros((0, 8), np.float32),
                                                  np.zeros((0, 8), np.float32), K, "elk")
    assert res.ids.shape == (0, K) and res.keys.shape == (0, K) and len(res.shortlist) == 0


@pytest.mark.parametrize("score", ("elk", "mc"))
def test_batch_equals_single_queries(reader, score):
    _, mu_q, lv_q = reader.all_vectors("text")
    s = BatchSearcher(reader, 5.0, 5.0)
    res = s.search("image", mu_q[:12], lv_q[:12], K, score)
    for i in range(12):
        one = s.search("image", mu_q[i:i + 1], lv_q[i:i + 1], K, score)
        np.testing.assert_array_equal(one.ids[0], res.ids[i])
        np.testing.assert_allclose(one.keys[0], res.keys[i], rtol=1e-6)


def test_manifest_without_mu_range_keeps_the_guarantee(good, tmp_path):
    """An index built before the μ range was recorded opens and still equals exhaustive
    search (the bound falls back to the line)."""
    import json
    import shutil

    old = tmp_path / "index"
    shutil.copytree(good / "index", old)
    manifest = json.loads((old / "manifest.json").read_text())
    for stats in manifest["variance_stats"].values():
        del stats["mu_min"], stats["mu_max"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with IndexReader.open(old) as r:
        _, mu_q, lv_q = r.all_vectors("text")
        s = BatchSearcher(r, 5.0, 5.0)
        assert s._bounds("image").mu_min is None
        for score in ("elk", "bhattacharyya"):
            got = s.search("image", mu_q[:20], lv_q[:20], K, score)
            want = s.search("image", mu_q[:20], lv_q[:20], K, score, exact=True)
            np.testing.assert_array_equal(np.sort(got.ids, axis=1), np.sort(want.ids, axis=1))
