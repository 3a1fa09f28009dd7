"""The web page in a real headless browser (Debian's chromium driven by Playwright): type a query,
see the API's first hit with its image loaded, click "more like this", upload an image, screenshot.
Skips only when no chromium binary exists (.ci/run installs it with apt-get)."""
import os
import shutil
import socket
import threading
import time
from functools import partial

import pytest
import uvicorn
from fastapi.testclient import TestClient

from cli import open_engine
from service.app import build_app
from service.registry import Registry

pytestmark = pytest.mark.slow
QUERY = "a dog in a park"


def chromium() -> str | None:
    found = [os.environ.get("PCME_CHROMIUM"), shutil.which("chromium"),
             shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((p for p in found if p and os.access(p, os.X_OK)), None)


@pytest.fixture()
def site(trained, tmp_path):
    """The app on a free loopback port, uvicorn on a thread of this process."""
    index = tmp_path / "index"
    shutil.copytree(trained / "index", index)
    registry = Registry({"tiny": index}, partial(open_engine, device="cpu"))
    registry.load_all()
    app = build_app(registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)


def test_page_search_more_like_this_and_upload(site, trained, tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run does this)")
    from playwright.sync_api import sync_playwright

    base, app = site
    api = TestClient(app)                          # the same service, asked directly
    want = api.get("/api/v1/search", params={"q": QUERY, "k": 20, "score": "elk"}).json()
    query_image = next((trained / "data").rglob("*.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(base + "/")
            page.locator("h1").click()                       # focus away from the search box
            page.keyboard.press("/")                         # "/" brings it back
            page.keyboard.type(QUERY)
            page.keyboard.press("Enter")
            first = page.wait_for_selector("#grid .hit")
            assert int(first.get_attribute("data-id")) == want["results"][0]["id"]
            page.wait_for_function("() => { const i = document.querySelector('#grid .hit img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            assert "q=a+dog+in+a+park" in page.url          # the state is in the URL
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            clicked = want["results"][1]["id"]
            page.locator("#grid .hit").nth(1).focus()
            page.keyboard.press("Enter")                     # more like this, from the keyboard
            page.wait_for_url(f"**item=image%3A{clicked}**")
            page.wait_for_selector(f"#grid .hit[data-rank='1'][data-id='{clicked}']")

            page.set_input_files("#file", str(query_image))
            caption = page.wait_for_selector("#captions .hit")
            up = api.post("/api/v1/search/image",
                          files={"file": (query_image.name, query_image.read_bytes(), "image/png")},
                          data={"k": "20"}).json()
            assert int(caption.get_attribute("data-id")) == up["results"][0]["id"]
            page.screenshot(path=str(tmp_path / "upload.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0
