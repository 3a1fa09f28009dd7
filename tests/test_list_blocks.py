"""Store formats 3 to 6: rows grouped by IVF inverted list (indexer/lists.py), the per-row
bounds of format 4 (engine/row_bounds.py), format 5's reads by id through `.where`, format
6's μ codes, and the engine path that reads them. References: the shards' rows,
nearest-centroid assignment recomputed in numpy, a float64 brute force over the probed lists,
and the id-by-id path of an older store written here from the same rows."""
import json
import shutil

import lmdb
import numpy as np
import pytest

from core.served_mc import fixed_match_prob
from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
from engine.batch import BatchSearcher
from engine.search import SearchEngine
from indexer.build import build_index
from indexer.blocks import decode_block, encode_block
from indexer.lists import list_key
from indexer.reader import IndexReader
from indexer.shards import read_shards
from indexer.store import encode_ids, stored_log_var
from tests.test_engine_search import brute, check_topk

D, N, K, NLIST, NPROBE = 16, 3000, 10, 16, 2
SCORES = ("elk", "bhattacharyya", "csd", "w2", "mc")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    spec = SyntheticSpec(N, D, n_queries=40, n_centres=30, lv_spread=1.0, lv_mean=-3.0)
    shards = write_synthetic_shards(spec, tmp_path_factory.mktemp("syn") / "shards")
    out = tmp_path_factory.mktemp("i") / "index"
    build_index(shards, out, factory=f"IVF{NLIST},Flat", nprobe=NPROBE)
    return out, shards


@pytest.fixture(scope="module")
def index(built):
    return built[0]


def _older(index, tmp_path, fmt: int):
    """A copy of `index` laid out as a build of format `fmt` wrote it: blocks without μ codes
    (before 6); every image row also by id in `image.vec` and no `image.where` (before 5);
    format 3 blocks without the row scalars; format 2 without blocks in the manifest."""
    old = tmp_path / f"format{fmt}"
    shutil.copytree(index, old)
    with IndexReader.open(index) as r:
        ids, mu, lv = r.all_vectors("image")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["store"]["format"] = fmt
    if fmt == 2:
        manifest["store"] = {k: v for k, v in manifest["store"].items() if k != "lists"}
    (old / "manifest.json").write_text(json.dumps(manifest))
    path = old / manifest["store"]["file"]
    env = lmdb.open(str(path), max_dbs=8, subdir=True,
                    map_size=4 * (path / "data.mdb").stat().st_size)
    with env.begin(write=True) as txn:
        if fmt < 5:
            vec = env.open_db(b"image.vec", txn=txn)
            for key, m, v in zip(encode_ids(ids), mu, lv):
                txn.put(key, m.tobytes() + v.astype(np.float16).tobytes(), db=vec)
            txn.drop(env.open_db(b"image.where", txn=txn), delete=True)
        db = env.open_db(b"image.lists", txn=txn)
        for number in range(NLIST):
            b = decode_block(txn.get(list_key(number), db=db), D, row_stats=True, codes=True)
            txn.put(list_key(number), encode_block(b.ids, b.mu, b.log_var, row_stats=fmt > 3,
                                                   codes=False), db=db)
    env.close()
    return old


def test_format_5_reads_by_id_and_in_full_give_the_shards_rows(built):
    """Rows live only in the blocks: reads by id (any order, repeats, across lists) and the
    exhaustive passes give back the shards' μ and stored log_var; no `.vec` is left."""
    index, shards = built
    batches = [b.select("image") for b in read_shards(shards)]
    ids = np.concatenate([b.ids for b in batches])
    mu = np.concatenate([b.mu for b in batches])[np.argsort(ids)]
    lv = stored_log_var(np.concatenate([b.log_var for b in batches]))[np.argsort(ids)]
    pick = np.random.default_rng(3).integers(0, N, 500)
    with IndexReader.open(index) as r:
        assert r.manifest["store"]["format"] == 6
        with pytest.raises(lmdb.Error):
            r._store.env.open_db(b"image.vec", create=False)
        got_mu, got_lv = r.fetch("image", pick)
        np.testing.assert_array_equal(got_mu, mu[pick])
        np.testing.assert_array_equal(got_lv, lv[pick])
        assert r.fetch("image", np.zeros(0, np.int64))[0].shape == (0, D)
        all_ids, all_mu, all_lv = r.all_vectors("image")
        np.testing.assert_array_equal(all_mu, mu)
        np.testing.assert_array_equal(all_lv, lv)
        seen = [(i, m, v) for i, m, v in r.vector_blocks("image", 700)]
    assert all(len(i) >= 700 for i, _, _ in seen[:-1])
    order = np.concatenate([i for i, _, _ in seen])
    np.testing.assert_array_equal(np.sort(order), np.arange(N))      # every row once
    np.testing.assert_array_equal(np.concatenate([m for _, m, _ in seen]), mu[order])
    np.testing.assert_array_equal(np.concatenate([v for _, _, v in seen]), lv[order])


def test_format_5_store_is_smaller_than_rows_twice(index, tmp_path):
    """The point of format 5: the store no longer holds each row twice (both without codes)."""
    def used(path):
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8, subdir=True)
        pages = env.info()["last_pgno"] + 1
        env.close()
        return pages
    old, new = _older(index, tmp_path, 4), _older(index, tmp_path, 5)
    row = 8 + 6 * D   # id + μ float32 + log_var float16: the bytes one copy of a row needs
    grown = used(old / "store.lmdb") - used(new / "store.lmdb")
    assert grown * 4096 > 0.9 * N * row


@pytest.fixture(scope="module")
def queries(index):
    with IndexReader.open(index) as r:
        _, mu, lv = r.all_vectors("text")
    return mu[:24], lv[:24]


def _centroids(reader):
    ivf = reader.list_blocks("image").ivf
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def test_blocks_hold_every_row_once_in_its_nearest_list(index):
    with IndexReader.open(index) as r:
        ids, mu, lv = r.all_vectors("image")
        centroids = _centroids(r)
        blocks = r.list_blocks("image")
        seen = []
        for number in range(NLIST):
            b = blocks.read(number)
            assert np.all(np.diff(b.ids) > 0)
            np.testing.assert_array_equal(b.mu, mu[b.ids])
            np.testing.assert_array_equal(b.log_var.astype(np.float32), lv[b.ids])
            # IVF assigns each row to its nearest centroid by inner product
            np.testing.assert_array_equal(np.argmax(b.mu @ centroids.T, axis=1),
                                          np.full(len(b.ids), number))
            seen.append(b.ids.copy())
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), ids)


@pytest.mark.parametrize("score", SCORES)
def test_list_path_equals_brute_force_over_the_probed_lists_and_the_id_path(index, queries,
                                                                            score):
    mu_q, lv_q = queries
    with IndexReader.open(index) as r:
        _, mu, lv = r.all_vectors("image")
        centroids = _centroids(r)
        got = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
        by_id = BatchSearcher(r, 5.0, 5.0, lists=False).search("image", mu_q, lv_q, K, score)
    home = np.argmax(mu @ centroids.T, axis=1)
    for i in range(len(mu_q)):
        probed = np.argsort(-(centroids @ mu_q[i]))[:NPROBE]
        inside = np.flatnonzero(np.isin(home, probed))
        ref = np.full(N, -np.inf)
        if score == "mc":  # a fixed shortlist: the μ top of the probed lists, rescored
            inside = inside[np.argsort(-(mu[inside] @ mu_q[i]), kind="stable")[:200]]
        if score == "mc":  # the serving noise is keyed by id
            q = [x.astype(np.float64)[None] for x in (mu_q[i], lv_q[i])]
            d = [x[inside].astype(np.float64) for x in (mu, lv)]
            ref[inside] = fixed_match_prob(*q, *d, inside, 5.0, 5.0)[0]
        else:
            ref[inside] = brute(score, mu_q[i], lv_q[i], mu[inside], lv[inside])
        check_topk(got.ids[i], got.keys[i], ref)
    np.testing.assert_array_equal(got.ids, by_id.ids)
    np.testing.assert_allclose(got.keys, by_id.keys, rtol=1e-5)


@pytest.mark.parametrize("score", ("elk", "bhattacharyya"))
def test_row_bounds_grow_a_short_first_shortlist_to_the_same_top_k(index, queries, score):
    """A first shortlist of only k rows (by bound) must grow, and still equal the id path."""
    mu_q, lv_q = queries
    with IndexReader.open(index) as r:
        got = BatchSearcher(r, 5.0, 5.0, initial=K).search("image", mu_q, lv_q, K, score)
        by_id = BatchSearcher(r, 5.0, 5.0, lists=False).search("image", mu_q, lv_q, K, score)
    np.testing.assert_array_equal(got.ids, by_id.ids)
    assert got.shortlist.max() > K and "bound_ms" in got.timings_ms


@pytest.mark.parametrize("fmt", (3, 4, 5))
def test_older_block_formats_open_and_search_alike(index, queries, tmp_path, fmt):
    """Format-4 and -5 stores (no μ codes: made when a block is read; format 4 also holds
    rows twice) search the same; blocks without the row scalars (an index built before
    format 4) are read as format 3 and searched with the one global bound per query: same
    results."""
    old = _older(index, tmp_path, fmt)
    mu_q, lv_q = queries
    with IndexReader.open(old) as a, IndexReader.open(index) as b:
        assert a.list_blocks("image").row_stats == (fmt > 3)
        assert b.list_blocks("image").row_stats
        assert not a.list_blocks("image").codes and b.list_blocks("image").codes
        assert (a.list_blocks("image").where is None) == (fmt < 5)   # by id: `.vec` or `.where`
        ra = BatchSearcher(a, 5.0, 5.0).search("image", mu_q, lv_q, K, "elk")
        rb = BatchSearcher(b, 5.0, 5.0).search("image", mu_q, lv_q, K, "elk")
        np.testing.assert_array_equal(a.fetch("image", ra.ids[0])[1], b.fetch("image", ra.ids[0])[1])
    np.testing.assert_array_equal(ra.ids, rb.ids)
    if fmt == 3:
        assert "bound_ms" not in ra.timings_ms and ra.shortlist.mean() > rb.shortlist.mean()


def test_too_few_probed_rows_widen_the_probe(index, queries):
    """nprobe 2 of 16 lists (~375 rows) cannot fill a first shortlist of 5·k = 1,000 at k = 200:
    the probe doubles until it can, like the ANN path's min_fill."""
    mu_q, lv_q = queries[0][:6], queries[1][:6]
    with IndexReader.open(index) as r:
        got = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, 200, "elk")
        by_id = BatchSearcher(r, 5.0, 5.0, lists=False).search("image", mu_q, lv_q, 200, "elk")
    assert got.shortlist.min() >= 1000
    np.testing.assert_array_equal(got.ids, by_id.ids)


def test_format_2_index_opens_and_searches_id_by_id(index, queries, tmp_path):
    old = _older(index, tmp_path, 2)
    mu_q, lv_q = queries
    with SearchEngine(old) as a, SearchEngine(index) as b:
        assert a.reader.list_blocks("image") is None
        # random rows by id: no readahead; whole ~1 MB blocks: the kernel may read ahead
        assert not a.reader._store.env.flags()["readahead"]
        assert b.reader._store.env.flags()["readahead"]
        ra = a.search_batch("image", mu_q, lv_q, K, "elk")
        rb = b.search_batch("image", mu_q, lv_q, K, "elk")
    np.testing.assert_array_equal(ra.ids, rb.ids)


def test_decode_block_refuses_partial_rows():
    with pytest.raises(ValueError, match="not whole rows"):
        decode_block(b"\0" * 13, D)


def test_rows_scored_in_small_pieces_equal_one_piece(index, queries, monkeypatch):
    """mc, the one score not scored in place, rescores gathered cache-sized pieces of rows."""
    score = "mc"
    import engine.list_search as list_search
    mu_q, lv_q = queries
    with IndexReader.open(index) as r:
        whole = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
        monkeypatch.setattr(list_search, "CHUNK_FLOATS", 5 * D)   # 5 rows a piece, ragged ends
        pieces = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
    np.testing.assert_array_equal(whole.ids, pieces.ids)
    np.testing.assert_allclose(whole.keys, pieces.keys, rtol=1e-6)
    assert whole.shortlist.min() > 5    # several 5-row pieces


@pytest.mark.parametrize("score", ("elk", "bhattacharyya", "csd"))
def test_a_batch_on_several_threads_equals_one_thread(index, queries, score):
    """Queries split over threads (engine/batch.py: _split) give what one thread gives, hits'
    rows included; a batch too small to split runs inline."""
    mu_q, lv_q = queries   # 24 queries: two runs of 12
    with IndexReader.open(index) as r:
        one = BatchSearcher(r, 5.0, 5.0, threads=1).search("image", mu_q, lv_q, K, score)
        two = BatchSearcher(r, 5.0, 5.0, threads=2)
        got = two.search("image", mu_q, lv_q, K, score)
        workers = set(two._pool._threads)   # started as pieces were handed out: 1 or 2
        assert workers and all(t.name.startswith("batch") for t in workers)
        two.close()
        assert two._pool is None and not any(t.is_alive() for t in workers)
        small = BatchSearcher(r, 5.0, 5.0, threads=2)
        small.search("image", mu_q[:3], lv_q[:3], K, score)
        assert small._pool is None
    for a, b in ((one.ids, got.ids), (one.keys, got.keys), (one.shortlist, got.shortlist),
                 *zip(one.vectors, got.vectors)):
        np.testing.assert_array_equal(a, b)


def test_csd_scores_every_probed_row_and_equals_the_bounded_path(index, queries, tmp_path):
    """csd is an inner product plus per-row terms: with format-4 blocks every probed row is
    scored exactly in one pass (shortlist = the probed rows); format-3 blocks (no per-row
    terms) take the bounded shortlist; same top k."""
    mu_q, lv_q = queries
    older = _older(index, tmp_path, 3)
    with IndexReader.open(index) as r, IndexReader.open(older) as old:
        got = BatchSearcher(r, 5.0, 5.0).search("image", mu_q, lv_q, K, "csd")
        bounded = BatchSearcher(old, 5.0, 5.0).search("image", mu_q, lv_q, K, "csd")
        blocks = r.list_blocks("image")
        probed = blocks.sizes(blocks.probe(mu_q)).sum(axis=1)
    np.testing.assert_array_equal(got.shortlist, probed)
    assert bounded.shortlist.max() < probed.min()
    np.testing.assert_array_equal(got.ids, bounded.ids)
    np.testing.assert_allclose(got.keys, bounded.keys, rtol=1e-5)


def test_a_modality_too_big_for_codes_is_bounded_from_float32_mu(built, queries, tmp_path,
                                                                  monkeypatch):
    """Past CODES_MAX_STORE a build writes no μ codes (the manifest lists none) and the bound
    reads float32 μ (scale 1, error 0): the same top k as the index with codes, and the
    store smaller by the codes' 2·D + 8 bytes a row."""
    import indexer.blocks as blocks
    from indexer.blocks import codes_for
    index, shards = built
    assert codes_for(N, D) and not codes_for(10_000_000, 256) and codes_for(1_000_000, 256)
    monkeypatch.setattr(blocks, "CODES_MAX_STORE", 0)
    plain = tmp_path / "plain"
    build_index(shards, plain, factory=f"IVF{NLIST},Flat", nprobe=NPROBE)
    mu_q, lv_q = queries
    with IndexReader.open(plain) as a, IndexReader.open(index) as b:
        assert a.manifest["store"]["mu_codes"] == [] and "image" in b.manifest["store"]["mu_codes"]
        block = a.list_blocks("image").read(0)
        assert block.codes is block.mu and (block.code_err == 0).all()
        for score in ("elk", "bhattacharyya"):
            ra = BatchSearcher(a, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
            rb = BatchSearcher(b, 5.0, 5.0).search("image", mu_q, lv_q, K, score)
            np.testing.assert_array_equal(ra.ids, rb.ids)
            np.testing.assert_array_equal(ra.shortlist, rb.shortlist)
    size = [sum(f.stat().st_size for f in (d / "store.lmdb").iterdir()) for d in (plain, index)]
    assert size[0] < size[1]
