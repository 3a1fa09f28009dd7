"""A real `cli.py serve` (uvicorn) subprocess on a free loopback port: ready at /readyz, queried
over HTTP, its index rebuilt in place and reloaded (admin endpoint, then SIGHUP) while a client
keeps querying, then stopped with SIGTERM."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.shards import ShardWriter, load_shards, read_shard_manifest

ROOT = Path(__file__).resolve().parents[1]
QUERY = "a dog in a park"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base, path, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(base, path):
    req = urllib.request.Request(base + path, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def reversed_shards(src: Path, out: Path) -> int:
    """The same items with image ids reversed (id i -> n-1-i): answers are recognisable."""
    images, texts = load_shards(src, "image"), load_shards(src, "text")
    n = len(images.ids)
    with ShardWriter(out, images.mu.shape[1], read_shard_manifest(src)["producer"]) as w:
        w.add("image", images.mu[::-1], images.log_var[::-1], images.items[::-1], np.arange(n))
        w.add("text", texts.mu, texts.log_var, texts.items, n - 1 - texts.groups)
    return n


@pytest.fixture()
def server(trained, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(trained / "index", index)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--index", f"tiny={index}",
                             "--port", str(port), "--device", "cpu"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return get(base, "/readyz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False
    try:
        wait_until(ready, 120, "/readyz")
        yield base, proc, index, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_serve_reload_under_load_and_clean_stop(server, trained):
    base, proc, index, tmp_path = server
    assert get(base, "/healthz") == (200, {"status": "ok"})
    status, first = get(base, "/api/v1/search", q=QUERY, k=5)
    assert status == 200 and len(first["results"]) == 5

    seen, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, body = get(base, "/api/v1/search", q=QUERY, k=5)
            except Exception as e:  # a dropped connection counts as a failure too
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append((status, body))
            else:
                seen.append((body["generation"], [(h["id"], h["item"]) for h in body["results"]]))
    loop = threading.Thread(target=client)
    loop.start()
    try:
        n = reversed_shards(trained / "out", tmp_path / "reversed")
        build_index(tmp_path / "reversed", index)               # atomic swap in place
        status, body = post(base, "/api/v1/admin/reload")
        assert status == 200, body
        new_gen = body["reloaded"]["tiny"]
        wait_until(lambda: seen and seen[-1][0] == new_gen, 30, "answers from the new index")

        build_index(trained / "out", index)                     # back again, now by SIGHUP
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: seen and seen[-1][0] not in (first["generation"], new_gen), 60,
                   "answers after SIGHUP")
    finally:
        stop.set()
        loop.join(30)
    assert not failures, failures[:3]
    generations = [g for g, _ in seen]
    switches = [g for i, g in enumerate(generations) if i == 0 or g != generations[i - 1]]
    assert switches == [first["generation"], new_gen, generations[-1]]   # no flapping back
    old_hits = [(h["id"], h["item"]) for h in first["results"]]
    new_hits = next(h for g, h in seen if g == new_gen)
    assert [(n - 1 - i, item) for i, item in old_hits] == new_hits
    assert seen[-1][1] == old_hits

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
