"""Service parts without a model: the micro-batcher on a fake engine, and images served by id
only from under the allowed roots (traversal, absolute paths and symlinks out get 404)."""
import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli import app as cli_app

from core.errors import PcmeError
from engine.search import SearchEngine
from indexer.build import build_index
from indexer.shards import ShardWriter
from service.app import build_app
from service.batcher import Closed, MicroBatcher, Query, QueueFull
from service.registry import Registry
from tests.helpers import one_error_line, unit, write_image

D = 8


class FakeEngine:
    """Records each search_many call; a query's only hit is id = round(μ[0] * 100)."""

    def __init__(self):
        self.calls, self.closed, self.encoder = [], False, self

    def _encoder(self):
        return self

    def encode_texts(self, texts):
        return [PcmeError("query: empty text") if not t else
                (np.full(D, len(t) / 100, np.float32), np.zeros(D, np.float32), []) for t in texts]

    def search_many(self, modality, mu, lv, k, score, exact=False):
        self.calls.append(len(mu))
        from engine.search import Hit
        return [([Hit(rank=1, id=int(round(m[0] * 100)), score=1.0, p_match=0.5, uncertainty=0.0,
                      item="x", group=0)], {}, 1) for m in mu]

    def confidence(self, query_modality, lv):
        return None, None

    def close(self):
        self.closed = True


def hold(batcher):
    """Block the worker until the returned event is set."""
    release, started = threading.Event(), threading.Event()
    batcher.call(lambda engine: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


def test_queued_queries_become_one_engine_call_and_errors_stay_per_query():
    engine = FakeEngine()
    b = MicroBatcher(engine, max_batch=8, max_wait_ms=0)
    release = hold(b)
    texts = ["a", "bb", "", "dddd", "eeeee"]
    futures = b.submit([Query("image", 1, "elk", text=t, label=t) for t in texts])
    release.set()
    results = [f.exception(10) or f.result(10) for f in futures]
    assert engine.calls == [4]                         # one search for the four valid texts
    assert isinstance(results[2], PcmeError)
    assert [r.results[0].id for r in results if not isinstance(r, Exception)] == [1, 2, 4, 5]
    assert all(r.timings_ms["batch"] == 5 for r in results if not isinstance(r, Exception))
    b.close(wait=True)
    assert engine.closed


def test_bounded_queue_max_batch_and_close_drains():
    engine = FakeEngine()
    b = MicroBatcher(engine, max_batch=2, max_wait_ms=0, max_queue=3)
    release = hold(b)
    futures = b.submit([Query("image", 1, "elk", text="a" * i) for i in range(1, 4)])
    with pytest.raises(QueueFull):
        b.submit([Query("image", 1, "elk", text="zz")])
    b.close()                                           # queued ones are still answered
    with pytest.raises(Closed):
        b.submit([Query("image", 1, "elk", text="zz")])
    release.set()
    assert [f.result(10).results[0].id for f in futures] == [1, 2, 3]
    assert engine.calls == [2, 1]
    b._thread.join(10)
    assert engine.closed


@pytest.fixture()
def image_index(tmp_path):
    """Images: 0 inside the root, 1 via '../', 2 absolute outside, 3 a symlink out, 4 missing."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_image(root / "a.png")
    write_image(outside / "secret.png", (0, 0, 255))
    os.symlink(outside / "secret.png", root / "link.png")
    items = [str(root / "a.png"), str(root / ".." / "outside" / "secret.png"),
             str(outside / "secret.png"), str(root / "link.png"), str(root / "gone.png")]
    rng = np.random.default_rng(0)
    n = len(items)
    with ShardWriter(tmp_path / "shards", D, {}) as w:
        w.add("image", unit(rng, n), np.full((n, D), -3, np.float32), items, np.arange(n))
        w.add("text", unit(rng, n), np.full((n, D), -3, np.float32), [f"t{i}" for i in range(n)],
              np.arange(n))
    build_index(tmp_path / "shards", tmp_path / "index")
    return tmp_path, root


def test_images_only_by_id_under_the_root(image_index):
    tmp_path, root = image_index
    registry = Registry({"x": tmp_path / "index"}, SearchEngine, image_roots=[root])
    registry.load_all()
    with TestClient(build_app(registry)) as c:
        ok = c.get("/api/v1/images/0?index=x")
        assert ok.status_code == 200 and ok.content == (root / "a.png").read_bytes()
        for bad in ("1", "2", "3", "4", "5", "-1", "..%2F..%2Foutside%2Fsecret.png",
                    "%2Fetc%2Fpasswd", "0%2F..%2F..%2Foutside%2Fsecret.png"):
            r = c.get(f"/api/v1/images/{bad}")
            assert r.status_code == 404 and set(r.json()) == {"error"}, (bad, r.text)
        r = c.get("/api/v1/search", params={"q": "a dog"})      # no model: no text queries
        assert r.status_code == 400 and "encoder" in r.json()["error"]


def test_default_root_is_the_images_common_folder(image_index):
    tmp_path, root = image_index
    registry = Registry({"x": tmp_path / "index"}, SearchEngine)
    registry.load_all()
    store = registry.get("x").images
    assert store.roots == [tmp_path.resolve()]      # items 0-3 share tmp_path
    assert store.path(0) is not None and store.path(4) is None
    registry.close()


def test_serve_bad_index_arguments_are_one_line_errors(image_index, record_property):
    tmp_path, _ = image_index
    runner = CliRunner()
    res = runner.invoke(cli_app, ["serve", "--index", str(tmp_path / "nowhere")])
    one_error_line(res, record_property, "nowhere")
    res = runner.invoke(cli_app, ["serve", "--index", f"a={tmp_path / 'index'}",
                                  "--index", f"a={tmp_path / 'index'}"])
    one_error_line(res, record_property, "given twice")
    res = runner.invoke(cli_app, ["serve", "--index", f"a={tmp_path / 'index'}", "--max-batch", "0"])
    one_error_line(res, record_property, "max_batch")


def test_a_rebuild_is_a_new_generation_even_within_the_same_second(image_index):
    """Two builds of the same shards differ by their build id, so the registry reloads the
    second even when `created` (one-second resolution), build time and counts are equal."""
    from indexer.manifest import read_index_manifest
    from service.registry import _generation
    tmp_path, _ = image_index
    first = read_index_manifest(tmp_path / "index")
    build_index(tmp_path / "shards", tmp_path / "index")
    second = read_index_manifest(tmp_path / "index")
    assert first["build_id"] != second["build_id"] and len(second["build_id"]) == 32
    same_second = dict(second, created=first["created"], build_s=first["build_s"])
    assert _generation(same_second) != _generation(first)
    # an index built before builds had an id keeps the generation it had (image URLs, ETags)
    old = {k: v for k, v in first.items() if k != "build_id"}
    key = f"{old['created']}:{old['build_s']}:{old['counts']}"
    assert _generation(old) == hashlib.sha256(key.encode()).hexdigest()[:12]
