"""The search endpoints: text, item, Gaussian, uploaded image and batch queries.

Every query becomes a batcher.Query on the chosen index's micro-batcher; the response is the
engine's QueryResult.to_json() (the `query --json` shape) plus `index`, and per image hit an
`image_url` and a `thumb_url` (images are fetched by id, never inlined).
"""
from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from core.errors import PcmeError
from core.constants import default_score
from core.scores import score_name
from service.batcher import Closed, Query, QueueFull
from service.errors import ApiError
from service.registry import Entry, NotFound

logger = logging.getLogger(__name__)

MAX_K = 1000
MAX_BATCH_QUERIES = 64
MAX_UPLOAD_BYTES = 8 * 2**20
THUMB_SIZE = 160
MODALITIES = ("image", "text")
OTHER = {"image": "text", "text": "image"}

router = APIRouter(prefix="/api/v1")


class ItemRef(BaseModel):
    modality: str
    id: int


class GaussianIn(BaseModel):
    mu: list[float]
    log_var: list[float]


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    item: ItemRef | None = None
    gaussian: GaussianIn | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    score: str | None = None      # None: the default of the query's modality (DEFAULT_SCORE)
    index: str | None = None
    exact: bool = False
    target: str | None = Field(None, description="modality searched; default: text->image, "
                               "item->the other modality, gaussian->image")


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[SearchBody] = Field(..., min_length=1, max_length=MAX_BATCH_QUERIES)


@router.get("/search")
async def search_get(request: Request, q: str = "", k: int = 10, score: str | None = None,
                     index: str | None = None, exact: bool = False):
    body = SearchBody(text=q, k=_check_k(k), score=score, index=index, exact=exact)
    return await _one(request, body)


@router.post("/search")
async def search_post(request: Request, body: SearchBody):
    return await _one(request, body)


@router.post("/search/batch")
async def search_batch(request: Request, body: BatchBody):
    """Each query answers on its own: a result, or {"error", "status"}. The queries of one
    index are queued together, so the worker takes them as one micro-batch."""
    registry = request.app.state.registry
    out: list = [None] * len(body.queries)
    groups: dict[str, list[tuple[int, Query]]] = {}
    for i, b in enumerate(body.queries):
        try:
            entry = registry.get(b.index)
            groups.setdefault(entry.name, []).append((i, _query(entry, b)))
        except (ApiError, PcmeError) as e:
            out[i] = _error_json(e)

    async def run(name, members):
        entry, results = await submit(request, name, lambda e: [q for _, q in members])
        for (i, _), result in zip(members, results):
            try:
                out[i] = _json(_raise(result), entry)
            except (ApiError, PcmeError) as e:
                out[i] = _error_json(e)
    await asyncio.gather(*(run(name, members) for name, members in groups.items()))
    return {"results": out}


@router.post("/search/image")
async def search_image(request: Request, file: UploadFile = File(...), k: int = Form(10),
                       score: str | None = Form(None), index: str | None = Form(None),
                       exact: bool = Form(False)):
    body = SearchBody(k=_check_k(k), score=score, index=index, exact=exact)
    data = await _read_capped(file)
    _check_image(data, file.filename)
    with tempfile.NamedTemporaryFile(suffix=Path(file.filename or "upload").suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        label = file.filename or "upload"

        def make(entry):
            return [Query("text", body.k, _score(body.score, "image", "text"), body.exact,
                          image=Path(tmp.name),
                          label=label)]
        entry, (result,) = await submit(request, body.index, make)
    return JSONResponse(_json(_raise(result), entry))


async def _one(request: Request, body: SearchBody) -> JSONResponse:
    entry, (result,) = await submit(request, body.index, lambda e: [_query(e, body)])
    return JSONResponse(_json(_raise(result), entry))   # plain dicts: skip FastAPI's encoder pass


def _error_json(e: Exception) -> dict:
    e = e if isinstance(e, ApiError) else _as_api_error(e)
    return {"error": e.message, "status": e.status}


async def submit(request: Request, index: str | None, make) -> tuple[Entry, list]:
    """Queue make(entry)'s queries on the index's batcher; (entry, results or exceptions).
    A batcher retired by a reload between get() and submit() is retried on the new one."""
    registry, metrics = request.app.state.registry, request.app.state.metrics
    for _ in range(3):
        entry = registry.get(index)
        try:
            futures = entry.batcher.submit(make(entry))
        except Closed:
            continue
        except QueueFull:
            metrics.reject()
            raise ApiError(503, "busy: the query queue is full, retry shortly",
                           {"Retry-After": "1"}) from None
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures),
                                       return_exceptions=True)
        return entry, results
    raise ApiError(503, "index is being reloaded, retry", {"Retry-After": "1"})


def _query(entry: Entry, body: SearchBody) -> Query:
    """Check a search body against the index and turn it into a batcher Query."""
    given = [n for n in ("text", "item", "gaussian") if getattr(body, n) is not None]
    if len(given) != 1:
        raise ApiError(400, "give exactly one of text, item or gaussian"
                       + (f" (got {', '.join(given)})" if given else ""))
    reader = entry.engine.reader
    if body.item is not None:
        modality, item_id = _modality(body.item.modality, "item.modality"), body.item.id
        if not 0 <= item_id < reader.count(modality):
            raise NotFound(f"{modality} id {item_id}: not in index {entry.name!r} "
                           f"({reader.count(modality)} {modality} items)")
        target = _modality(body.target or OTHER[modality], "target")
        return Query(target, body.k, _score(body.score, modality, target), body.exact,
                     item=(modality, item_id), label=f"{modality} #{item_id}")
    target = _modality(body.target or "image", "target")
    if body.text is not None:
        return Query(target, body.k, _score(body.score, "text", target), body.exact,
                     text=body.text, label=body.text)
    score = _score(body.score, OTHER[target], target)   # a raw Gaussian: a cross-modal query
    mu = np.asarray(body.gaussian.mu, np.float32)
    lv = np.asarray(body.gaussian.log_var, np.float32)
    if mu.shape != (reader.dim,) or lv.shape != (reader.dim,):
        raise ApiError(400, f"gaussian: mu and log_var need {reader.dim} values each, got "
                       f"{mu.size} and {lv.size}")
    if not (np.isfinite(mu).all() and np.isfinite(lv).all()):
        raise ApiError(400, "gaussian: mu and log_var must be finite")
    return Query(target, body.k, score, body.exact, gaussian=(mu, lv), label="gaussian")


def _json(result, entry: Entry) -> dict:
    d = result.to_json()
    d["index"], d["generation"] = entry.name, entry.generation
    if result.modality == "image":
        for hit in d["results"]:
            hit.update(image_urls(entry, hit["id"]))
    return d


def image_urls(entry: Entry, image_id: int) -> dict:
    url = f"/api/v1/images/{image_id}?index={entry.name}&v={entry.generation}"
    return {"image_url": url, "thumb_url": f"{url}&size={THUMB_SIZE}"}


def _raise(result):
    if isinstance(result, BaseException):
        raise _as_api_error(result) if isinstance(result, PcmeError) else result
    return result


def _as_api_error(e: PcmeError) -> ApiError:
    return ApiError(404 if isinstance(e, NotFound) else 400, str(e))


def _score(name: str | None, query_modality: str, target: str) -> str:
    """The score asked for, or the default for that search (core.constants.default_score)."""
    try:
        return score_name(name or default_score(query_modality, target))
    except PcmeError as e:
        raise ApiError(422, str(e)) from None


def _check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ApiError(422, f"k {k}: must be between 1 and {MAX_K}")
    return k


def _modality(name: str, what: str) -> str:
    if name not in MODALITIES:
        raise ApiError(422, f"{what} {name!r}: expected image or text")
    return name


async def _read_capped(file: UploadFile) -> bytes:
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"{file.filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    if not data:
        raise ApiError(400, f"{file.filename}: empty upload")
    return data


def _check_image(data: bytes, name: str | None) -> None:
    """415 for anything Pillow does not recognise as an image (decoding happens on the worker)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except UnidentifiedImageError:
        raise ApiError(415, f"{name}: not an image file") from None
    except Exception as e:  # truncated or corrupt data in a known format
        raise ApiError(400, f"{name}: cannot decode image ({e})") from None
