"""Indexer: factory choice, FAISS vs brute force, LMDB store round trip, build atomicity,
nprobe selection, and the reader's error paths."""

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import PcmeError
from indexer import build as build_mod
from indexer import faiss_index as fx
from indexer.build import build_index
from indexer.reader import IndexReader
from indexer.shards import ShardWriter, load_shards

D = 16


def clustered(rng, n, centers):
    """Unit vectors around shared centres: structure like real embeddings, so IVF works."""
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shards(out: Path, n_image: int, n_text: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, D))
    with ShardWriter(out, D, {"checkpoint": "runs/x.pt", "sha256": "ab"}, rows_per_shard=1500) as w:
        for m, n in (("image", n_image), ("text", n_text)):
            for start in range(0, n, 1000):
                k = min(1000, n - start)
                lv = rng.normal(-5, 2, (k, D)).astype(np.float32)
                w.add(m, clustered(rng, k, centers), lv, [f"{m} n°{start + j}" for j in range(k)],
                      np.arange(start, start + k) // 5)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Images get IVF (n > 5,000), captions stay Flat."""
    return write_shards(tmp_path_factory.mktemp("s") / "out", n_image=6000, n_text=1200)


@pytest.fixture(scope="module")
def index(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("i") / "index"
    build_index(shards, out)
    return out


def brute_topk(queries, base, k):
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def test_choose_factory():
    assert fx.choose_factory(10, 8) == "Flat"
    assert fx.choose_factory(5000, 8) == "Flat"
    assert fx.choose_factory(6000, 8) == "IVF128,Flat"        # 4·sqrt ≈ 310 -> 256, capped: 6000/39 -> 128
    assert fx.choose_factory(100_000, 8) == "IVF1024,Flat"    # 4·sqrt ≈ 1265 -> 1024
    assert fx.choose_factory(1_000_000, 8) == "IVF1024,Flat"
    assert fx.choose_factory(3_000_000, 8) == "IVF1024,SQ8"           # flat quantizer: K <= 1024
    assert fx.choose_factory(5_000_000, 8) == "IVF8192_HNSW32,SQ8"
    for n in (5001, 20_000, 300_000):
        k = int(fx.choose_factory(n, 8)[3:].split(",")[0])
        assert k & (k - 1) == 0 and n / k >= 39


def test_ivf_with_nprobe_nlist_equals_brute_force():
    rng = np.random.default_rng(1)
    base, queries = clustered(rng, 3000, rng.standard_normal((20, D))), rng.standard_normal((25, D))
    index = fx.make_index("IVF32,Flat", D)
    fx.train(index, base, "IVF32,Flat")
    fx.add(index, base, np.arange(3000))
    _, ids = fx.search(index, queries.astype(np.float32), 10, nprobe=32)
    np.testing.assert_array_equal(ids, brute_topk(queries.astype(np.float32), base, 10))
    _, few = fx.search(index, queries.astype(np.float32), 10, nprobe=1)
    assert not np.array_equal(few, ids)  # nprobe really is passed through


def test_build_manifest(shards, index):
    m = json.loads((index / "manifest.json").read_text())
    assert m["kind"] == "index" and m["dim"] == D and m["metric"] == "inner_product"
    assert m["counts"] == {"image": 6000, "text": 1200}
    assert m["factory"] == {"image": "IVF128,Flat", "text": "Flat"}
    assert m["nprobe"]["text"] is None and 1 <= m["nprobe"]["image"] <= 128
    assert m["store"]["format"] == 6 and m["store"]["lists"] == ["image"]
    assert m["producer"] == {"checkpoint": "runs/x.pt", "sha256": "ab"}
    assert m["shards"]["dir"] == str(shards.absolute())
    assert sorted(p.name for p in index.iterdir()) == ["image.faiss", "manifest.json", "store.lmdb", "text.faiss"]


def test_reader_search_on_flat_equals_brute_force(shards, index):
    text = load_shards(shards, "text")
    queries = load_shards(shards, "image").mu[:30]
    with IndexReader.open(index) as r:
        ids, ip = r.search("text", queries, 7)
    np.testing.assert_array_equal(ids, brute_topk(queries, text.mu, 7))
    np.testing.assert_allclose(ip, np.take_along_axis(queries @ text.mu.T, ids, 1), rtol=1e-5)


def test_reader_search_never_returns_padding(index):
    q = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    with IndexReader.open(index) as r:
        ids, _ = r.search("image", q, 6000, nprobe=1)  # 1 list of 128 cannot hold 6000 hits
        assert ids.shape == (5, 6000) and (ids >= 0).all()
        assert all(len(set(row)) == 6000 for row in ids.tolist())
        ids, _ = r.search("text", q, 10**6)  # n clipped to the count
        assert ids.shape == (5, 1200)


def test_store_round_trip_flat_and_ivf(shards, index):
    with IndexReader.open(index) as r:
        for m in ("image", "text"):
            ref = load_shards(shards, m)
            pick = np.array([0, 17, r.count(m) - 1, 17])
            mu, log_var = r.fetch(m, pick)
            np.testing.assert_array_equal(mu, ref.mu[pick])  # exact: reconstructed from FAISS
            # float16 keeps 11 significant bits: relative error <= 2**-11
            np.testing.assert_allclose(log_var, ref.log_var[pick], rtol=2**-11, atol=1e-6)
            np.testing.assert_array_equal(r.fetch_log_var(m, pick), log_var)
            assert r.meta(m, pick) == [(int(ref.groups[i]), ref.items[i]) for i in pick]
            ids, all_mu, all_lv = r.all_vectors(m)
            np.testing.assert_array_equal(ids, ref.ids)
            np.testing.assert_array_equal(all_mu, ref.mu)
            np.testing.assert_allclose(all_lv, ref.log_var, rtol=2**-11, atol=1e-6)
        with pytest.raises(PcmeError, match="store.lmdb: no text id 1200"):
            r.fetch("text", np.array([3, 1200]))


@pytest.mark.parametrize("factory", ["IVF16,SQ8", pytest.param("PQ4x4", marks=pytest.mark.slow)])
def test_store_holds_exact_mu_for_compressed_codes(shards, tmp_path, factory):
    out = tmp_path / "index"
    build_index(shards, out, factory=factory, nprobe=4)
    ref = load_shards(shards, "image")
    with IndexReader.open(out) as r:
        pick = np.array([5, 4000, 5999])
        mu, _ = r.fetch("image", pick)
        np.testing.assert_array_equal(mu, ref.mu[pick])
        np.testing.assert_array_equal(r.all_vectors("image")[1], ref.mu)
        assert r.search("image", ref.mu[:3], 5)[0].shape == (3, 5)


def test_failed_build_keeps_old_index(shards, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(shards, out)
    before = (out / "manifest.json").read_text()
    queries = load_shards(shards, "text").mu[:5]
    with IndexReader.open(out) as r:
        expected = r.search("image", queries, 5)[0]

    calls = []
    real_put = build_mod.StoreWriter.put

    def put_then_fail(self, *args, **kwargs):  # fail after part of the store is written
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(build_mod.StoreWriter, "put", put_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_index(shards, out, factory="IVF32,Flat")
    assert (out / "manifest.json").read_text() == before
    with IndexReader.open(out) as r:
        np.testing.assert_array_equal(r.search("image", queries, 5)[0], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_choose_nprobe_is_smallest_reaching_target():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((30, D))
    base, queries = clustered(rng, 8000, centers), clustered(rng, 200, centers)
    index = fx.make_index("IVF64,Flat", D)
    fx.train(index, base, "IVF64,Flat")
    fx.add(index, base, np.arange(len(base)))
    truth = brute_topk(queries, base, 10)
    nprobe, recall = fx.choose_nprobe(index, queries, truth, target=0.95)

    def measured(p):  # independent recall: set overlap per query, numpy only
        found = fx.search(index, queries, 10, p)[1]
        return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])

    assert measured(nprobe) >= 0.95 and recall == pytest.approx(measured(nprobe))
    assert nprobe == 1 or measured(nprobe // 2) < 0.95


def test_build_nprobe_reaches_recall_on_fresh_queries(shards, index):
    image = load_shards(shards, "image")
    rng = np.random.default_rng(4)
    fresh = clustered(rng, 300, image.mu[rng.choice(6000, 40)])  # queries near the data, unseen
    with IndexReader.open(index) as r:
        found, _ = r.search("image", fresh, 10)
    truth = brute_topk(fresh, image.mu, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.9  # target 0.95 on the build's own probes; fresh queries vary a little


def test_single_modality_and_override_errors(tmp_path):
    shards = write_shards(tmp_path / "out", n_image=0, n_text=300, seed=5)
    manifest = build_index(shards, tmp_path / "index")
    assert manifest["counts"] == {"image": 0, "text": 300} and "image" not in manifest["factory"]
    with IndexReader.open(tmp_path / "index") as r:
        ids, ip = r.search("image", np.ones((2, D), np.float32), 5)
        assert ids.shape == (2, 0) and r.all_vectors("image")[1].shape == (0, D)
        with pytest.raises(PcmeError, match="queries have shape"):
            r.search("text", np.ones((2, D + 1), np.float32), 5)
    with pytest.raises(PcmeError, match="--factory 'IVF9999,Flat'"):
        build_index(shards, tmp_path / "index2", factory="IVF9999,Flat")
    with pytest.raises(PcmeError, match="--factory 'Nonsense42'"):
        build_index(shards, tmp_path / "index2", factory="Nonsense42")
    with pytest.raises(PcmeError, match="refusing"):
        build_index(shards, shards)  # a shard dir is not an index dir: never clobbered
    assert not (tmp_path / "index2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "out"]


def test_reader_errors_name_the_missing_file(index, tmp_path):
    with pytest.raises(PcmeError, match="directory does not exist"):
        IndexReader.open(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((index / "manifest.json").read_text())
    with pytest.raises(PcmeError, match="image.faiss: FAISS index file is missing"):
        IndexReader.open(broken)
    for name in ("image.faiss", "text.faiss"):
        (broken / name).write_bytes((index / name).read_bytes())
    with pytest.raises(PcmeError, match="store.lmdb: LMDB store is missing"):
        IndexReader.open(broken)
    (broken / "text.faiss").write_bytes(b"garbage")
    with pytest.raises(PcmeError, match="text.faiss: unreadable FAISS index"):
        IndexReader.open(broken)


def test_store_grows_when_full_and_clips_extreme_log_var(tmp_path, caplog):
    from indexer.store import StoreReader, StoreWriter
    rng = np.random.default_rng(6)
    log_var = rng.normal(0, 5, (300, D)).astype(np.float32)
    log_var[0, :3] = [-30.0, 25.0, -20.0]
    mu = rng.standard_normal((300, D)).astype(np.float32)
    items = [f"{i} " + "long caption ✓ " * 200 for i in range(300)]  # ~1 MB: past the 64 KiB map
    store = StoreWriter(tmp_path / "s.lmdb", map_size=64 << 10)
    for start in (0, 150):
        sl = slice(start, start + 150)
        store.put("text", np.arange(start, start + 150), mu[sl], log_var[sl],
                  np.arange(300)[sl] // 3, items[sl])
    with caplog.at_level("WARNING"):
        store.close()
    assert "clipped 2 log_var values" in caplog.text
    reader = StoreReader(tmp_path / "s.lmdb", D)
    got_mu, got = reader.scan("text", 300)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got[0, :3], [-20.0, 20.0, -20.0])
    np.testing.assert_allclose(got[1:], log_var[1:], rtol=2**-11, atol=1e-6)
    assert reader.meta("text", np.array([299, 0])) == [(99, items[299]), (0, items[0])]
    reader.close()


@pytest.mark.parametrize("old_store", [{"file": "store.lmdb", "dtype": "float16",
                                         "mu_in_store": {"image": False, "text": False}},
                                        {"file": "store.lmdb", "format": 1}])
def test_old_store_format_fails_with_rebuild_message(index, tmp_path, old_store):
    """Format 1 (σ alone, μ from FAISS) cannot serve a one-read shortlist: one line, rebuild."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(index, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["store"] = old_store
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PcmeError) as e:
        IndexReader.open(old)
    msg = str(e.value)
    assert "\n" not in msg and "store format 1" in msg and "rebuild" in msg and str(old) in msg


def test_store_row_holds_exact_mu_and_float16_log_var(tmp_path):
    """One `vec` row per id: float32 μ bytes then float16 log_var bytes, read back by getmulti."""
    from indexer.store import StoreReader, StoreWriter, encode_ids, row_bytes
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((40, D)).astype(np.float32)
    lv = rng.normal(-3, 1, (40, D)).astype(np.float32)
    w = StoreWriter(tmp_path / "s.lmdb", 1 << 22)
    w.put("image", np.arange(40), mu, lv, np.arange(40), [str(i) for i in range(40)])
    w.close()
    r = StoreReader(tmp_path / "s.lmdb", D)
    (raw,) = r.get("image", "vec", np.array([7]))
    assert len(raw) == row_bytes(D) == 6 * D
    np.testing.assert_array_equal(np.frombuffer(raw[:4 * D], np.float32), mu[7])
    np.testing.assert_array_equal(np.frombuffer(raw[4 * D:], np.float16), lv[7].astype(np.float16))
    got_mu, got_lv = r.vectors("image", np.array([39, 0, 7, 7]))
    np.testing.assert_array_equal(got_mu, mu[[39, 0, 7, 7]])
    np.testing.assert_array_equal(got_lv, lv[[39, 0, 7, 7]].astype(np.float16).astype(np.float32))
    part = r.scan("image", 40, 10, 25)
    np.testing.assert_array_equal(part[0], mu[10:25])
    assert encode_ids(np.array([1]))[0] == (1).to_bytes(8, "big")
    r.close()


def test_kmeans_through_a_clustering_index_equals_the_default(shards):
    """The GPU build path hands k-means a flat index for its assignments (kmeans_index); on the
    CPU a flat IP index in that slot must give the same centroids as FAISS' own path."""
    import faiss
    sample = load_shards(shards, "image").mu[:2000]
    default, via = fx.make_index("IVF16,Flat", D), fx.make_index("IVF16,Flat", D)
    fx.train(default, sample, "IVF16,Flat")
    clustering = faiss.IndexFlatIP(D)
    fx.train(via, sample, "IVF16,Flat", clustering=clustering)
    assert clustering.ntotal == 16  # k-means assigned through it (it holds the centroids)
    c0 = default.quantizer.reconstruct_n(0, 16)
    np.testing.assert_allclose(via.quantizer.reconstruct_n(0, 16), c0, rtol=1e-5, atol=1e-6)
    assert fx.ivf_of(via).clustering_index is None  # not kept after training
