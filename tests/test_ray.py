"""Scale-out on Ray, on one machine: a head with no CPU and two one-CPU worker nodes
(ray.cluster_utils.Cluster), shared by the tests of this module. Faults are injected through
the code's own hook (core.cluster.fault_point: request files in $PCME_FAULT_DIR), and every
wait is on an event (a file the hook writes, a job finishing)."""
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ray  # noqa: E402  (in the `test` extra)

from core.cluster import FAULT_ENV, OBJECT_STORE_BYTES, ray_runtime_env  # noqa: E402
from engine.search import SearchEngine  # noqa: E402
from indexer.build import build_index  # noqa: E402
from indexer.shards import load_shards, validate_shards  # noqa: E402
from tests.helpers import write_shards  # noqa: E402

SCORES = ("mu", "elk", "csd", "w2", "bhattacharyya", "mc")
N, DIM, PART_ROWS = 6000, 16, 4096   # two index parts per modality, the second one partial


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    faults = tmp_path_factory.mktemp("faults")
    saved = {k: os.environ.get(k) for k in (FAULT_ENV, "RAY_USAGE_STATS_ENABLED")}
    os.environ.update({FAULT_ENV: str(faults), "RAY_USAGE_STATS_ENABLED": "0"})
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES})
    workers = [c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)]
    ray.init(address=c.address, runtime_env=ray_runtime_env(), logging_level=logging.WARNING)
    try:
        yield c, workers, faults
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def indexes(cluster, tmp_path_factory):
    """Synthetic shards, the single-process index, the Ray-built index and the sharded one."""
    from indexer.distributed import build_index_distributed

    root = tmp_path_factory.mktemp("ray_index")
    write_shards(root / "shards", N, DIM, rows_per_shard=2500)
    build_index(root / "shards", root / "single")
    build_index_distributed(root / "shards", root / "merged", part_rows=PART_ROWS)
    build_index_distributed(root / "shards", root / "sharded", part_rows=PART_ROWS, sharded=True)
    return root


@pytest.fixture(scope="module")
def engines(indexes):
    """(single-index engine, sharded engine): shared by (d) and (e), which runs last."""
    from engine.sharded import ShardedEngine

    with SearchEngine(indexes / "single") as a, ShardedEngine(indexes / "sharded") as b:
        yield a, b


def queries(n=8, seed=3):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, DIM)).astype(np.float32)
    return mu / np.linalg.norm(mu, axis=1, keepdims=True), rng.normal(-4, 1, (n, DIM)).astype(np.float32)


def encode_args(trained, out):
    return (str(trained / "run" / "checkpoint.pt"), "scenes", str(trained / "data"), "test", str(out), "cpu")


def assert_same_shards(reference: Path, got: Path):
    validate_shards(got)
    for m in ("image", "text"):
        a, b = load_shards(reference, m), load_shards(got, m)
        assert np.array_equal(a.ids, b.ids) and a.items == b.items
        assert np.array_equal(a.groups, b.groups)
        # same batches as the single-process encode; only the BLAS thread count differs
        np.testing.assert_allclose(b.mu, a.mu, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.log_var, a.log_var, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_distributed_encode_equals_single_process(cluster, trained, tmp_path):
    from encoders.training.distributed import encode_distributed

    path, facts = encode_distributed(*encode_args(trained, tmp_path / "out"), part_rows=512)
    assert facts["parts"] > 2 and facts["workers_lost"] == 0
    assert_same_shards(trained / "out", path)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # staging folder gone


@pytest.mark.slow
def test_b_killed_worker_and_removed_node_leave_every_id_once(cluster, trained, tmp_path):
    from encoders.training.distributed import encode_distributed

    c, workers, faults = cluster
    (faults / "kill-encode-text-000000001024.parquet").touch()   # dies on its first attempt
    (faults / "hold-encode-text-000000002048.parquet").touch()   # parks a worker mid-job
    result = {}
    job = threading.Thread(target=lambda: result.update(
        out=encode_distributed(*encode_args(trained, tmp_path / "out"), part_rows=512)),
        daemon=True)
    job.start()
    held, node = (faults / f"{w}-encode-text-000000002048.parquet" for w in ("held", "node"))
    try:
        deadline = time.monotonic() + 300   # a safety net: the wait is on the hook's files
        while not (node.exists() and node.read_text()) and job.is_alive() \
                and time.monotonic() < deadline:
            job.join(0.05)
        assert held.exists(), "no worker reached the held part"
        lost = next(i for i, w in enumerate(workers) if w.node_id == node.read_text())
        c.remove_node(workers[lost])       # the node of the worker holding the part, mid-part
    finally:   # whatever failed above, no worker may stay parked: later tests need the CPUs
        (faults / "hold-encode-text-000000002048.parquet").unlink(missing_ok=True)
        held.unlink(missing_ok=True)
    job.join(600)   # the wait is on the job; minutes only on a machine busy with other work
    assert not job.is_alive()
    path, facts = result["out"]
    assert (faults / "killed-encode-text-000000001024.parquet").exists()
    assert facts["workers_lost"] >= 2   # the killed worker and the removed node's actor
    assert_same_shards(trained / "out", path)
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".parts")]
    assert leftovers == [] and sorted(os.listdir(tmp_path)) == ["out"]
    workers[lost] = c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)  # for later tests


@pytest.mark.slow
def test_c_distributed_index_gives_the_same_top_k(indexes):
    mu, lv = queries()
    with SearchEngine(indexes / "single") as a, SearchEngine(indexes / "merged") as b:
        assert b.reader.manifest["build"]["ray"]["parts"]
        assert a.reader.manifest["nprobe"] == b.reader.manifest["nprobe"]
        for m in ("image", "text"):
            for score in SCORES:
                ra, rb = a.search_batch(m, mu, lv, 10, score), b.search_batch(m, mu, lv, 10, score)
                assert np.array_equal(ra.ids, rb.ids), (m, score)
                np.testing.assert_allclose(rb.keys, ra.keys, rtol=1e-6)
        ids = np.arange(0, N, 997)
        assert a.reader.meta("image", ids) == b.reader.meta("image", ids)
        np.testing.assert_array_equal(a.reader.fetch("text", ids)[1], b.reader.fetch("text", ids)[1])


@pytest.mark.slow
def test_d_sharded_search_equals_the_single_index(engines):
    """Exhaustive scoring (exact=True) at k = 1, 10, 100 checks the merge itself; the served
    path (ANN shortlist with the same quantizer and nprobe) is checked at k = 1 and 10. At
    k = 100 the smaller shard's probed lists can hold fewer rows than its shortlist, and the
    reader then widens nprobe for it, so the sharded answer may be better than the single
    index's, not equal."""
    a, b = engines
    mu, lv = queries(4)
    for k, exact in ((1, True), (10, True), (100, True), (1, False), (10, False)):
        for score in SCORES:
            ra = a.search_batch("image", mu, lv, k, score, exact)
            rb = b.search_batch("image", mu, lv, k, score, exact)
            assert not rb.missing
            assert np.array_equal(ra.ids, rb.ids), (k, score, exact)
            np.testing.assert_allclose(rb.keys, ra.keys, rtol=1e-6)
    # served hits: the shards answer arrays, the driver builds the hits and p(match)
    for q, ((hits, _, _), (single, _, _)) in enumerate(zip(
            b.search_many("text", mu, lv, 10, "elk"), a.search_many("text", mu, lv, 10, "elk"))):
        assert [(h.id, h.rank, h.item, h.group) for h in hits] == \
            [(h.id, h.rank, h.item, h.group) for h in single], q
        for name in ("score", "p_match", "uncertainty"):
            np.testing.assert_allclose([getattr(h, name) for h in hits],
                                       [getattr(h, name) for h in single], rtol=1e-5)
    assert not b.search("text", mu[0], lv[0], 10, "elk")[2]   # no shard missing


@pytest.mark.slow
def test_e_killed_shard_actor_is_restarted_or_reported(indexes, engines, cluster):
    (a, b), faults = engines, cluster[2]
    mu, lv = queries(4, seed=5)
    want = a.search_batch("image", mu, lv, 10, "elk")
    (faults / "kill-search-image-000000004096").touch()   # dies while answering
    got = b.search_batch("image", mu, lv, 10, "elk")
    assert (faults / "killed-search-image-000000004096").exists()
    assert not got.missing and np.array_equal(got.ids, want.ids)
    ray.kill(b.actors[0], no_restart=True)              # image-000000000000, for good
    got = b.search_batch("image", mu, lv, 10, "elk")
    assert got.missing == ["image-000000000000"]
    assert (got.ids >= PART_ROWS).all()                 # only the surviving shard's ids
    with SearchEngine(indexes / "sharded" / "image-000000004096") as rest:
        local = rest.search_batch("image", mu, lv, 10, "elk")
    assert np.array_equal(got.ids, local.ids + PART_ROWS)


@pytest.mark.slow
def test_f_cli_builds_and_queries_a_sharded_index(cluster, trained, tmp_path):
    """The CLI wiring: index --ray --sharded, then query --ray answers as the ordinary index
    built from the same shards (Flat parts here: the scenes test split is small)."""
    import json

    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["index", "--shards", str(trained / "out"), "--out", str(tmp_path / "s"),
                              "--ray", "auto", "--sharded", "--part-rows", "4096"])
    assert res.exit_code == 0, res.output
    answers = []
    for index, extra in ((trained / "index", []), (tmp_path / "s", ["--ray", "auto"])):
        res = runner.invoke(app, ["query", "a street scene", "--index", str(index), "--json",
                                  "--k", "20", *extra])
        assert res.exit_code == 0, res.output
        answers.append(json.loads(res.stdout))
    assert answers[1]["partial"] is False and answers[1]["missing_shards"] == []
    assert [(h["id"], h["item"]) for h in answers[1]["results"]] == \
        [(h["id"], h["item"]) for h in answers[0]["results"]]


def test_bad_ray_address_is_one_line(tmp_path, record_property):
    from typer.testing import CliRunner

    from cli import app
    from tests.helpers import one_error_line

    write_shards(tmp_path / "shards", 10)
    res = CliRunner().invoke(app, ["index", "--shards", str(tmp_path / "shards"), "--out",
                                   str(tmp_path / "i"), "--ray", "local:0"])
    one_error_line(res, record_property, "--ray", "local:N")
    assert not (tmp_path / "i").exists()
