"""The search service in-process (FastAPI TestClient) on the tiny trained index: every endpoint
answers what SearchEngine answers, and every failure is JSON with the right status."""
import io
import json
import shutil
from functools import partial

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cli import open_engine
from core.scores import SCORES
from service import api
from service.app import build_app
from service.registry import Registry

LOOPBACK = ("127.0.0.1", 50000)
QUERIES = ["a dog in a park", "people waiting for a train", "a red car"]


@pytest.fixture(scope="module")
def engine(trained, tmp_path_factory):
    """The reference: a plain SearchEngine on a copy (LMDB opens a store once per process)."""
    copy = tmp_path_factory.mktemp("reference") / "index"
    shutil.copytree(trained / "index", copy)
    with open_engine(copy) as e:
        yield e


@pytest.fixture(scope="module")
def client(trained):
    registry = Registry({"tiny": trained / "index"}, partial(open_engine, device="cpu"))
    registry.load_all()
    with TestClient(build_app(registry), client=LOOPBACK) as c:
        yield c


def is_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "Traceback" not in body["error"], body
    return body["error"]


def same_hits(got: dict, want, tol=1e-6):
    assert [h["id"] for h in got["results"]] == [h.id for h in want.results]
    for g, w in zip(got["results"], want.results):
        assert abs(g["score"] - w.score) <= tol * max(1.0, abs(w.score)), (g, w)
        assert abs(g["uncertainty"] - w.uncertainty) <= 1e-6


def test_health_ready_and_indices(client, trained):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "indexes": ["tiny"]}
    manifest = json.loads((trained / "index" / "manifest.json").read_text())
    (info,) = client.get("/api/v1/indices").json()["indices"]
    assert info["name"] == "tiny" and info["default"]
    assert info["counts"] == manifest["counts"] and info["dim"] == manifest["dim"]
    assert info["factory"] == manifest["factory"] and info["nprobe"] == manifest["nprobe"]
    assert info["model_sha256"] == manifest["producer"]["checkpoint_sha256"]
    assert set(info["scores"]) == set(SCORES)


@pytest.mark.parametrize("score", sorted(SCORES))
def test_text_search_equals_engine(client, engine, score):
    for q in QUERIES:
        got = client.get("/api/v1/search", params={"q": q, "k": 7, "score": score}).json()
        want = engine.query_text(q, 7, score)
        same_hits(got, want)
        assert got["modality"] == "image" and got["score"] == score and got["query"] == q
        assert abs(got["query_uncertainty"] - want.query_uncertainty) <= 1e-6
        for field in want.to_json():   # everything query --json has, whatever fields it grows
            assert field in got, field
        for h in got["results"]:
            assert h["image_url"].startswith(f"/api/v1/images/{h['id']}?index=tiny")
            assert "size=" in h["thumb_url"]


def test_post_and_exact_equal_engine(client, engine):
    got = client.post("/api/v1/search", json={"text": QUERIES[0], "k": 5, "score": "csd",
                                              "exact": True}).json()
    same_hits(got, engine.query_text(QUERIES[0], 5, "csd", exact=True))


def test_item_query_equals_its_stored_gaussian(client, engine):
    from core.constants import DEFAULT_SCORE

    mu, lv = engine.reader.fetch("image", np.array([3]))
    want, _, _ = engine.search("text", mu[0], lv[0], 6, DEFAULT_SCORE["image"])
    got = client.post("/api/v1/search", json={"item": {"modality": "image", "id": 3}, "k": 6}).json()
    assert got["modality"] == "text"
    assert [h["id"] for h in got["results"]] == [h.id for h in want]
    item = client.get("/api/v1/items/image/3").json()
    np.testing.assert_array_equal(np.float32(item["mu"]), mu[0])
    np.testing.assert_array_equal(np.float32(item["log_var"]), lv[0])
    again = client.post("/api/v1/search", json={"gaussian": {"mu": item["mu"], "log_var": item["log_var"]},
                                                "target": "text", "k": 6}).json()
    assert [h["id"] for h in again["results"]] == [h["id"] for h in got["results"]]
    same_image = client.post("/api/v1/search", json={"item": {"modality": "image", "id": 3},
                                                     "target": "image", "k": 1}).json()
    assert same_image["results"][0]["id"] == 3            # an image is its own nearest image


def test_batch_equals_single_queries(client):
    bodies = [{"text": QUERIES[0]}, {"text": QUERIES[1], "score": "mc", "k": 4},
              {"item": {"modality": "text", "id": 2}, "k": 3}, {"text": QUERIES[2], "score": "w2"},
              {"text": ""}, {"text": QUERIES[0], "index": "nope"}]
    got = client.post("/api/v1/search/batch", json={"queries": bodies}).json()["results"]
    for b, g in zip(bodies[:4], got[:4]):
        single = client.post("/api/v1/search", json=b).json()
        assert [h["id"] for h in g["results"]] == [h["id"] for h in single["results"]]
        np.testing.assert_allclose([h["score"] for h in g["results"]],
                                   [h["score"] for h in single["results"]], rtol=1e-5, atol=1e-5)
    assert got[4]["status"] == 400 and got[5]["status"] == 404
    too_many = client.post("/api/v1/search/batch", json={"queries": [{"text": "a dog"}] * 65})
    is_error(too_many, 422)


def test_image_upload_equals_engine(client, engine, trained):
    path = next((trained / "data").rglob("*.png"))
    r = client.post("/api/v1/search/image", files={"file": (path.name, path.read_bytes(), "image/png")},
                    data={"k": "5", "score": "mc"})
    assert r.status_code == 200, r.text
    assert r.json()["modality"] == "text"
    same_hits(r.json(), engine.query_image(path, 5, "mc"))


def test_no_score_given_means_the_default_of_the_query_modality(client, trained):
    """Text (and caption items) rank by DEFAULT_SCORE["text"], image uploads and image items
    by DEFAULT_SCORE["image"], as `query` does; a search within one modality ("more like
    this") by SAME_MODALITY_SCORE. The page sends no score for "default"."""
    from core.constants import DEFAULT_SCORE, SAME_MODALITY_SCORE

    assert client.get("/api/v1/search", params={"q": QUERIES[0]}).json()["score"] \
        == DEFAULT_SCORE["text"]
    item = {"item": {"modality": "text", "id": 1}, "k": 2}
    assert client.post("/api/v1/search", json=item).json()["score"] == DEFAULT_SCORE["text"]
    item = {"item": {"modality": "image", "id": 1}, "k": 2}
    assert client.post("/api/v1/search", json=item).json()["score"] == DEFAULT_SCORE["image"]
    path = next((trained / "data").rglob("*.png"))
    r = client.post("/api/v1/search/image", data={"k": "3"},
                    files={"file": (path.name, path.read_bytes(), "image/png")})
    assert r.json()["score"] == DEFAULT_SCORE["image"] != DEFAULT_SCORE["text"]
    item["target"] = "image"
    assert client.post("/api/v1/search", json=item).json()["score"] == SAME_MODALITY_SCORE


def test_error_statuses(client, monkeypatch):
    assert "empty" in is_error(client.get("/api/v1/search", params={"q": "  "}), 400)
    assert "vocabulary" in is_error(client.get("/api/v1/search", params={"q": "qzxv wxqz"}), 400)
    is_error(client.post("/api/v1/search", json={"k": 3}), 400)
    is_error(client.post("/api/v1/search", json={"text": "a dog", "item": {"modality": "image", "id": 1}}), 400)
    is_error(client.post("/api/v1/search", json={"gaussian": {"mu": [0.1], "log_var": [0.0]}}), 400)
    is_error(client.get("/api/v1/search", params={"q": "a dog", "index": "nope"}), 404)
    is_error(client.post("/api/v1/search", json={"item": {"modality": "image", "id": 10**6}}), 404)
    is_error(client.get("/api/v1/items/image/999999"), 404)
    is_error(client.get("/api/v1/items/sound/1"), 404)
    is_error(client.get("/api/v1/images/999999"), 404)
    is_error(client.get("/no/such/page"), 404)
    is_error(client.delete("/api/v1/search"), 405)
    for k in (0, 5000):
        assert "k" in is_error(client.get("/api/v1/search", params={"q": "a dog", "k": k}), 422)
        is_error(client.post("/api/v1/search", json={"text": "a dog", "k": k}), 422)
    assert "score" in is_error(client.get("/api/v1/search", params={"q": "a dog", "score": "cosine"}), 422)
    is_error(client.post("/api/v1/search", content=b"{not json", headers={"content-type": "application/json"}), 422)
    is_error(client.post("/api/v1/search/image", files={"file": ("x.png", b"not an image", "image/png")}), 415)
    monkeypatch.setattr(api, "MAX_UPLOAD_BYTES", 100)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "BMP")
    is_error(client.post("/api/v1/search/image", files={"file": ("big.bmp", buf.getvalue(), "image/bmp")}), 413)


def test_full_queue_answers_503_with_retry_after(client, monkeypatch):
    import threading

    batcher = client.app.state.registry.get("tiny").batcher
    release, started = threading.Event(), threading.Event()
    batcher.call(lambda engine: (started.set(), release.wait(10)))   # hold the worker
    try:
        assert started.wait(10)
        monkeypatch.setattr(batcher, "max_queue", 0)
        r = client.get("/api/v1/search", params={"q": "a dog"})
        is_error(r, 503)
        assert r.headers["retry-after"] == "1"
        assert "pcme_rejected_total 1" in client.get("/metrics").text
    finally:
        release.set()
    monkeypatch.undo()
    assert client.get("/api/v1/search", params={"q": "a dog"}).status_code == 200


def test_images_etag_cache_and_thumbnails(client, engine):
    hit = client.get("/api/v1/search", params={"q": QUERIES[0], "k": 1}).json()["results"][0]
    r = client.get(hit["image_url"])
    assert r.status_code == 200 and r.content == open(hit["item"], "rb").read()
    assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
    assert client.get(hit["image_url"], headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    t = client.get(hit["thumb_url"])
    assert t.headers["content-type"] == "image/png" and t.headers["etag"] != r.headers["etag"]
    assert max(Image.open(io.BytesIO(t.content)).size) <= int(hit["thumb_url"].rsplit("=", 1)[1])
    is_error(client.get(hit["image_url"] + "&size=33"), 422)


def test_metrics_and_page(client):
    client.get("/api/v1/search", params={"q": QUERIES[1]})
    text = client.get("/metrics").text
    assert 'pcme_requests_total{method="GET",route="/api/v1/search",status="200"}' in text
    assert 'pcme_request_seconds_bucket{route="/api/v1/search",le="+Inf"}' in text
    assert "pcme_batch_size_count" in text
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_reload_is_loopback_only_and_a_failed_load_keeps_serving(trained, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(trained / "index", copy)
    registry = Registry({"tiny": copy}, partial(open_engine, device="cpu"))
    registry.load_all()
    app = build_app(registry)
    remote = TestClient(app, client=("10.1.2.3", 1234))   # no lifespan: the registry stays open
    is_error(remote.post("/api/v1/admin/reload"), 403)
    with TestClient(app, client=LOOPBACK) as c:
        before = c.get("/api/v1/search", params={"q": QUERIES[0]}).json()["results"]
        (copy / "manifest.json").write_text("{broken")
        assert "manifest.json" in is_error(c.post("/api/v1/admin/reload"), 500)
        assert c.get("/api/v1/search", params={"q": QUERIES[0]}).json()["results"] == before
        assert c.get("/api/v1/indices").json()["indices"][0]["last_reload_error"]
        shutil.copy(trained / "index" / "manifest.json", copy / "manifest.json")
        assert c.post("/api/v1/admin/reload", params={"index": "tiny"}).status_code == 200
        assert c.get("/api/v1/search", params={"q": QUERIES[0]}).json()["results"] == before
