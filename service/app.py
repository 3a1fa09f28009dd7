"""The FastAPI app: health, index list, items, images, metrics, admin reload, the web page, and
the JSON error contract (`{"error": "..."}` with a proper status, never an HTML page or a
traceback). `serve` runs it under uvicorn with SIGHUP bound to a reload."""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import PcmeError
from engine.search import uncertainty
from service import api
from service.errors import ApiError
from service.images import CACHE_CONTROL, THUMB_SIZES
from service.metrics import Metrics
from service.registry import NotFound, Registry

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "::1"}


def build_app(registry: Registry, metrics: Metrics | None = None) -> FastAPI:
    """The app over `registry`; its indexes load in the background at start-up (so /healthz
    answers at once and /readyz once they are in) unless they are loaded already."""
    metrics = metrics or Metrics()
    registry.on_batch = registry.on_batch or metrics.batch

    @asynccontextmanager
    async def lifespan(app):
        if not registry.ready.is_set():
            threading.Thread(target=registry.load_all, name="pcme-load", daemon=True).start()
        yield
        registry.close()

    app = FastAPI(title="pcme-search", version="1", lifespan=lifespan, docs_url="/api/v1/docs",
                  redoc_url=None, openapi_url="/api/v1/openapi.json")
    app.state.registry, app.state.metrics = registry, metrics
    app.add_middleware(_Timing, metrics=metrics)
    _errors(app)
    app.include_router(api.router)
    _routes(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _routes(app: FastAPI) -> None:
    registry: Registry = app.state.registry

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if not registry.ready.is_set():
            why = "; ".join(f"{n}: {e}" for n, e in registry.errors.items()) or "loading"
            raise ApiError(503, f"not ready: {why}", {"Retry-After": "1"})
        return {"status": "ready", "indexes": list(registry.entries)}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics_text():
        waiting = sum(e.batcher.waiting for e in registry.entries.values())
        thumbs = sum(e.images.cached_bytes for e in registry.entries.values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return app.state.metrics.render({"pcme_queue_waiting": waiting,
                                         "pcme_thumbnail_cache_bytes": thumbs,
                                         "pcme_max_rss_bytes": rss})

    @app.get("/api/v1/indices")
    def indices():
        out = [registry.entries[n].info() for n in registry.dirs if n in registry.entries]
        for d in out:
            d["default"] = d["name"] == registry.default
            d["last_reload_error"] = registry.errors.get(d["name"])
        return {"indices": out}

    @app.get("/api/v1/items/{modality}/{item_id}")
    async def item(modality: str, item_id: str, index: str | None = None):
        entry = registry.get(index)
        if modality not in api.MODALITIES or not item_id.isdigit() \
                or int(item_id) >= entry.engine.reader.count(modality):
            raise NotFound(f"{modality}/{item_id}: no such item in index {entry.name!r}")
        row = await _on_worker(entry, lambda engine: _item(engine, modality, int(item_id)))
        if modality == "image":
            row.update(api.image_urls(entry, row["id"]))
        return row

    @app.get("/api/v1/images/{image_id}")
    def image(image_id: str, request: Request, index: str | None = None, size: int | None = None):
        entry = registry.get(index)
        path = entry.images.path(int(image_id)) if image_id.isdigit() else None
        if path is None:
            raise NotFound(f"image {image_id}: not found in index {entry.name!r}")
        if size is not None and size not in THUMB_SIZES:
            raise ApiError(422, f"size {size}: choose one of {', '.join(map(str, THUMB_SIZES))}")
        tag = entry.images.etag(path, size or 0)
        headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        if size is None:
            return FileResponse(path, headers=headers)
        try:
            data, _ = entry.images.thumbnail(int(image_id), path, size)
        except OSError as e:
            raise ApiError(415, f"image {image_id}: unreadable ({e})") from None
        return Response(data, media_type="image/png", headers=headers)

    @app.post("/api/v1/admin/reload")
    def reload(request: Request, index: str | None = None):
        if request.client is None or request.client.host not in LOOPBACK:
            raise ApiError(403, "reload is allowed from the loopback interface only")
        outcome = registry.reload([index] if index else None)
        failed = {n: why for n, why in outcome.items() if why}
        if failed:
            raise ApiError(500, "reload failed, still serving the previous index: "
                           + "; ".join(f"{n}: {why}" for n, why in failed.items()))
        return {"reloaded": {n: registry.entries[n].generation for n in outcome}}


async def _on_worker(entry, fn):
    try:
        return await asyncio.wrap_future(entry.batcher.call(fn))
    except PcmeError as e:
        raise ApiError(404 if isinstance(e, NotFound) else 400, str(e)) from None


def _item(engine, modality: str, item_id: int) -> dict:
    ids = np.array([item_id])
    mu, lv = engine.reader.fetch(modality, ids)
    (group, item), = engine.reader.meta(modality, ids)
    return {"modality": modality, "id": item_id, "item": item, "group": int(group),
            "uncertainty": float(uncertainty(lv[0])), "mu": mu[0].tolist(),
            "log_var": lv[0].tolist()}


def _errors(app: FastAPI) -> None:
    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(PcmeError)
    async def pcme_error(request, e: PcmeError):
        return error(404 if isinstance(e, NotFound) else 400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = e.detail if e.status_code != 404 else f"{request.url.path}: not found"
        return error(e.status_code, str(message), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({type(e).__name__})")


class _Timing:
    """Pure ASGI middleware: count and time every HTTP request by route template."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t, status = time.perf_counter(), [500]

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status[0], time.perf_counter() - t)


def serve(registry: Registry, host: str, port: int, log_level: str = "info") -> None:
    """Run the service in this process until SIGTERM/SIGINT; SIGHUP reloads every index."""
    import uvicorn

    app = build_app(registry)

    def on_hup(signum, frame):
        threading.Thread(target=registry.reload, name="pcme-reload", daemon=True).start()
    signal.signal(signal.SIGHUP, on_hup)
    # uvicorn re-raises the stop signal after its graceful shutdown; answered here, the process
    # then ends normally (exit 0) instead of being killed by the default handler.
    signal.signal(signal.SIGTERM, lambda signum, frame: logger.info("stopped (SIGTERM)"))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    logger.info("serving on http://%s:%d/ (pid %d)", host, port, os.getpid())
    uvicorn.Server(config).run()
