"""Engine at scale, on tiny synthetic data: IVF at nprobe = nlist equals Flat; a full
shortlist equals exhaustive scoring for every score; the bounded shortlist equals exhaustive
search; the bounds are never beaten; exact search equals a float64 brute force."""
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from core import scores as S
from engine.batch import BatchSearcher
from core.served_mc import MC_SAMPLES, fixed_match_prob, item_noise
from engine.search import SearchEngine
from indexer.variance import VarianceBounds, unseen_best
from benchmarks.harness import SINGLE_ROUNDS
from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
from indexer.build import build_index
from indexer.reader import IndexReader
from indexer.shards import load_shards

D, N, K = 16, 3000, 10
ALL = ("mu", "elk", "csd", "w2", "bhattacharyya", "mc")
BOUNDED = ("mu", "elk", "csd", "w2", "bhattacharyya")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # lv_spread 1.0: variances differ a lot between items, so probabilistic and μ rankings
    # disagree and the bounded shortlist has to grow
    spec = SyntheticSpec(N, D, n_queries=60, n_centres=30, lv_spread=1.0, lv_mean=-3.0)
    return write_synthetic_shards(spec, tmp_path_factory.mktemp("syn") / "shards")


@pytest.fixture(scope="module")
def flat(shards, tmp_path_factory):
    return _build(shards, tmp_path_factory, "Flat", None)


def _build(shards, factory_tmp, factory, nprobe):
    out = factory_tmp.mktemp("i") / "index"
    build_index(shards, out, factory=factory, nprobe=nprobe)
    return out


@pytest.fixture(scope="module")
def ivf_full(shards, tmp_path_factory):
    return _build(shards, tmp_path_factory, "IVF16,Flat", 16)


@pytest.fixture(scope="module")
def queries(flat):
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("text")
    return mu, lv


def brute(score, mu_q, lv_q, mu, lv, a=5.0, b=5.0):
    """Float64 reference: the contract's single-pair functions over every item."""
    q = [torch.from_numpy(x.astype(np.float64)) for x in (mu_q, lv_q)]
    d = [torch.from_numpy(x.astype(np.float64)) for x in (mu, lv)]
    if score == "mu":
        raw = S.mu_sim(q[0][None], d[0])
    elif score == "mc":
        eps_q, eps_d = item_noise(np.arange(len(mu)), MC_SAMPLES, mu.shape[1])
        raw = S.match_prob(q[0][None], q[1][None], d[0], d[1], a, b, MC_SAMPLES,
                           eps_q=torch.from_numpy(eps_q).double(),
                           eps_d=torch.from_numpy(eps_d).double())
    else:
        raw = S.SCORES[score][0](q[0][None], q[1][None], d[0], d[1])
    return S.rank_key(score, raw).numpy()


def check_topk(ids, keys, ref_keys, k=K):
    """ids/keys equal the reference top-k (ties within rounding may swap order)."""
    order = np.argsort(-ref_keys, kind="stable")[:k]
    np.testing.assert_allclose(keys, ref_keys[order], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref_keys[ids], ref_keys[order], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("score", [pytest.param(s, marks=pytest.mark.slow) if s == "mc" else s
                                   for s in ALL])
def test_full_shortlist_and_exact_equal_brute_force(flat, queries, score):
    mu_q, lv_q = queries[0][:8], queries[1][:8]
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("image")
        full = BatchSearcher(r, 5.0, 5.0, initial=N).search("image", mu_q, lv_q, K, score)
        exact = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, score, exact=True)
    for i in range(len(mu_q)):
        ref = brute(score, mu_q[i], lv_q[i], mu, lv)
        check_topk(full.ids[i], full.keys[i], ref)
        check_topk(exact.ids[i], exact.keys[i], ref)


@pytest.mark.parametrize("score", [s if s == "mu" else pytest.param(s, marks=pytest.mark.slow)
                                   for s in BOUNDED])
def test_bounded_shortlist_equals_exhaustive(flat, queries, score):
    mu_q, lv_q = queries
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("image")
        res = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
    for i in range(len(mu_q)):
        check_topk(res.ids[i], res.keys[i], brute(score, mu_q[i], lv_q[i], mu, lv))
    if score in ("elk", "bhattacharyya"):  # the data makes the first shortlist too short
        assert res.shortlist.max() > 5 * K


def test_fixed_shortlist_would_miss_items(flat, queries):
    """The μ top-k is not the ELK top-k on this data: rescoring and the bound matter."""
    mu_q, lv_q = queries
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("image")
    misses = 0
    for i in range(len(mu_q)):
        first = np.argsort(-(mu @ mu_q[i]))[:K]
        top = np.argsort(-brute("elk", mu_q[i], lv_q[i], mu, lv))[:K]
        misses += len(set(top) - set(first))
    assert misses > 0


@pytest.mark.parametrize("score", BOUNDED)
def test_unseen_bound_is_never_beaten(flat, queries, score):
    mu_q, lv_q = queries
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("image")
        bounds = VarianceBounds.from_json(r.variance_stats("image"))
    for i in range(0, len(mu_q), 6):
        ip = mu @ mu_q[i]
        keys = brute(score, mu_q[i], lv_q[i], mu, lv)
        for t in np.quantile(ip, [0.5, 0.9, 0.99, 0.999]):
            outside = ip <= t
            assert keys[outside].max() <= unseen_best(score, float(t), mu_q[i], lv_q[i], bounds) + 1e-6


@pytest.mark.parametrize("score", ("mu", "elk", pytest.param("mc", marks=pytest.mark.slow)))
def test_ivf_nprobe_nlist_equals_flat(flat, ivf_full, queries, score):
    mu_q, lv_q = queries[0][:20], queries[1][:20]
    with SearchEngine(flat) as a, SearchEngine(ivf_full) as b:
        ra = a.search_batch("image", mu_q, lv_q, K, score)
        rb = b.search_batch("image", mu_q, lv_q, K, score)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_allclose(ra.keys, rb.keys, rtol=1e-5)


def test_mc_score_does_not_depend_on_the_shortlist(flat, queries):
    mu_q, lv_q = queries[0][:3], queries[1][:3]
    with IndexReader.open(flat) as r:
        small = BatchSearcher(r, 5.0, 5.0, initial=50).search("image", mu_q, lv_q, K, "mc")
        big = BatchSearcher(r, 5.0, 5.0, initial=400).search("image", mu_q, lv_q, K, "mc")
    for i in range(3):
        common = np.intersect1d(small.ids[i], big.ids[i])
        assert len(common) > 0
        ks = dict(zip(small.ids[i], small.keys[i]))
        kb = dict(zip(big.ids[i], big.keys[i]))
        for j in common:
            assert math.isclose(ks[j], kb[j], rel_tol=1e-6)


def test_search_hits_and_exact_flag(flat, queries):
    with SearchEngine(flat) as e:
        hits, timings, shortlist = e.search("image", queries[0][0], queries[1][0], 5, "elk")
        exact_hits, _, _ = e.search("image", queries[0][0], queries[1][0], 5, "elk", exact=True)
    assert [h.id for h in hits] == [h.id for h in exact_hits]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i].score >= hits[i + 1].score for i in range(4))
    assert hits[0].item == f"image-{hits[0].id}" and shortlist >= 5


@pytest.mark.parametrize("score", ("mc", "elk"))
def test_hits_p_match_is_the_fixed_noise_match_probability(flat, queries, score):
    """p_match of every hit against a float64 fixed_match_prob of the hit; under mc the
    engine takes it from the rank key instead of drawing it again."""
    mu_q, lv_q = queries[0][0], queries[1][0]
    with SearchEngine(flat) as e:
        hits, _, _ = e.search("image", mu_q, lv_q, 5, score)
        ids = np.array([h.id for h in hits])
        mu, lv = e.reader.fetch("image", ids)
        a, b = e.batch.a, e.batch.b
    q = [x.astype(np.float64)[None] for x in (mu_q, lv_q)]
    d = [x.astype(np.float64) for x in (mu, lv)]
    ref = fixed_match_prob(*q, *d, ids, a, b)[0]
    np.testing.assert_allclose([h.p_match for h in hits], ref, rtol=1e-5, atol=1e-7)
    if score == "mc":
        assert [h.p_match for h in hits] == [h.score for h in hits]


def _reference_keys(score, mu_q, lv_q, items, a, b):
    """Float64 keys of every item; mc through the one-matmul kernel of the serving noise (the
    pair-by-pair `brute` takes ~10 s per query at N = 6000; test_full_shortlist_and_exact_equal_brute_force ties the
    two together)."""
    if score != "mc":
        return brute(score, mu_q, lv_q, items.mu, items.log_var, a, b)
    q = [x.astype(np.float64)[None] for x in (mu_q, lv_q)]
    d = [x.astype(np.float64) for x in (items.mu, items.log_var)]
    return fixed_match_prob(*q, *d, items.ids, a, b)[0]


@pytest.mark.slow
def test_cli_bench_synthetic_json_and_plot(tmp_path):
    out = CliRunner().invoke(app, [
        "bench", "--synthetic", "6000", "--dim", "8", "--workdir", str(tmp_path / "w"),
        "--queries", "20", "--batch", "8", "--recall-queries", "10", "--mc-recall-queries", "3",
        "--scores", "mu,elk,mc", "--plot", str(tmp_path / "p.png"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["n"] == 6000 and report["dim"] == 8 and report["factory"] == "IVF128,Flat"
    assert set(report["scores"]) == {"mu", "elk", "mc"} and report["queries"] == 20
    # every reported recall@10 equals one recomputed here: the engine's answers to the same
    # queries (the 20 stored captions) against a float64 brute force over the shards' vectors
    images, captions = (load_shards(tmp_path / "w" / "shards", m) for m in ("image", "text"))
    with SearchEngine(tmp_path / "w" / "index") as engine:
        a, b = engine.batch.a, engine.batch.b
        for score, n_rec in (("mu", 10), ("elk", 10), ("mc", 3)):
            s = report["scores"][score]
            assert s["recall_queries"] == n_rec and s["p50_ms"] > 0 and s["qps"] > 0
            rounds = s["p50_ms_rounds"]   # the pooled median lies among the rounds' medians
            assert len(rounds) == SINGLE_ROUNDS
            assert min(rounds) - 1e-3 <= s["p50_ms"] <= max(rounds) + 1e-3
            hits = []
            for q in range(n_rec):
                found = {h.id for h in engine.search("image", captions.mu[q], captions.log_var[q],
                                                     K, score)[0]}
                ref = _reference_keys(score, captions.mu[q], captions.log_var[q], images, a, b)
                hits.append(len(found & set(np.argsort(-ref, kind="stable")[:K].tolist())) / K)
            assert s["recall@10"] == pytest.approx(np.mean(hits), abs=1e-4), score
    assert report["scores"]["elk"]["recall@10"] >= 0.9
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_errors():
    out = CliRunner().invoke(app, ["bench"])
    assert out.exit_code == 2 and "--index DIR or --synthetic N" in out.output


@pytest.mark.parametrize("score", ("elk", "mc"))
def test_exact_search_streams_the_store_beyond_the_cache_limit(flat, queries, score, monkeypatch):
    """Above CACHE_MAX_BYTES (10M × 256 would not fit) blocks come from the store: same answer."""
    from engine import exact
    mu_q, lv_q = queries[0][:4], queries[1][:4]
    with IndexReader.open(flat) as r:
        cached = exact.ExactSearcher(r, "image").topk(score, mu_q, lv_q, K)
        monkeypatch.setattr(exact, "CACHE_MAX_BYTES", 0)
        streamed = exact.ExactSearcher(r, "image")
        got = streamed.topk(score, mu_q, lv_q, K)
        assert streamed._mu is None  # nothing was cached
    np.testing.assert_array_equal(got[0], cached[0])
    np.testing.assert_allclose(got[1], cached[1], rtol=1e-6)


def test_range_search_fallback_when_threshold_is_beyond_the_ann_list(flat, queries, monkeypatch):
    """With a one-deep ANN list every bounded query needs the range search: same answer."""
    import engine.batch as batch
    mu_q, lv_q = queries
    with IndexReader.open(flat) as r:
        _, mu, lv = r.all_vectors("image")
        monkeypatch.setattr(batch, "prefetch_depth", lambda k, n, first: first)
        res = BatchSearcher(r, 5.0, 5.0).search("image", mu_q[:10], lv_q[:10], K, "elk")
    assert res.shortlist.max() > 5 * K
    for i in range(10):
        check_topk(res.ids[i], res.keys[i], brute("elk", mu_q[i], lv_q[i], mu, lv))


def test_short_prefetch_rows_equal_the_range_search_path(shards, tmp_path_factory, queries,
                                                          monkeypatch):
    """nprobe 2 of 16 lists holds fewer items than the prefetch asks for: such a row already
    holds every probed item above the threshold, so it must agree with the range search."""
    import engine.batch as batch
    ivf = _build(shards, tmp_path_factory, "IVF16,Flat", 2)
    mu_q, lv_q = queries[0][:12], queries[1][:12]
    with IndexReader.open(ivf) as r:
        ids, _ = r.search("image", mu_q, 2000, min_fill=50)
        assert ((ids >= 0).sum(axis=1) < 2000).all() and (ids[:, :50] >= 0).all()
        got = BatchSearcher(r, 5.0, 5.0, lists=False).search("image", mu_q, lv_q, K, "elk")
        monkeypatch.setattr(batch, "prefetch_depth", lambda k, n, first: first)
        ref = BatchSearcher(r, 5.0, 5.0, lists=False).search("image", mu_q, lv_q, K, "elk")
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_allclose(got.keys, ref.keys, rtol=1e-6)
