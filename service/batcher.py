"""The engine's one worker thread, fed by a micro-batcher.

Requests queue up; the worker takes the first, then whatever else arrives within `max_wait_ms`
(up to `max_batch`), encodes every text of the batch in one forward pass and searches each group
of equal (modality, k, score, exact) with one `SearchEngine.search_many` call: one ANN call, one
σ fetch and one rescore per group. Only this thread touches the engine, so its lazy caches
(LMDB handles, IVF direct maps) need no lock. The queue is bounded: `submit` refuses with
QueueFull beyond `max_queue` waiting queries (the service answers 503 + Retry-After).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PcmeError
from core.timing import elapsed_ms
from engine.search import QueryResult, uncertainty

logger = logging.getLogger(__name__)
QUERY_MODALITY = {"image": "text", "text": "image"}   # results -> the query that found them

MAX_BATCH = 32        # queries per engine call
MAX_WAIT_MS = 2.0     # how long the first query of a batch waits for company
MAX_QUEUE = 256       # waiting queries beyond which the service answers 503


class QueueFull(Exception):
    """More queries are waiting than the queue holds."""


class Closed(Exception):
    """The batcher was retired (index reload): submit to the current one."""


@dataclass
class Query:
    """One search. Exactly one of text, image (a file), gaussian (μ, log_var) or item
    ((modality, id): that item's stored Gaussian) is set; `modality` is what is searched."""
    modality: str
    k: int
    score: str
    exact: bool = False
    text: str | None = None
    image: Path | None = None
    gaussian: tuple[np.ndarray, np.ndarray] | None = None
    item: tuple[str, int] | None = None
    label: str = ""
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Call:
    """Any other engine access (item lookups): fn(engine) on the worker thread."""
    fn: object
    future: Future = field(default_factory=Future)


_STOP = object()


def check_options(max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
                  max_queue: int = MAX_QUEUE) -> None:
    if max_batch < 1 or max_queue < 1 or not 0 <= max_wait_ms <= 1000:
        raise PcmeError(f"batcher: max_batch {max_batch} and max_queue {max_queue} must be "
                        f">= 1, max_wait_ms {max_wait_ms} in 0..1000")


class MicroBatcher:
    def __init__(self, engine, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
                 max_queue: int = MAX_QUEUE, on_batch=None, name: str = "engine"):
        check_options(max_batch, max_wait_ms, max_queue)
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch or (lambda n: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"pcme-{name}", daemon=True)
        self._thread.start()

    # -- producer side (any thread) ------------------------------------------------------------
    def submit(self, queries: list[Query]) -> list[Future]:
        """Queue all of `queries` or none of them."""
        with self._lock:
            if self._closed:
                raise Closed()
            if self._waiting + len(queries) > self.max_queue:
                raise QueueFull()
            self._waiting += len(queries)
            for q in queries:
                self._queue.put(q)
        return [q.future for q in queries]

    def call(self, fn) -> Future:
        with self._lock:
            if self._closed:
                raise Closed()
            job = _Call(fn)
            self._queue.put(job)
        return job.future

    @property
    def waiting(self) -> int:
        return self._waiting

    def close(self, wait: bool = False) -> None:
        """Stop taking queries; the worker answers those already queued, then closes the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if wait:
            self._thread.join()

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is _STOP:
                break
            if isinstance(job, _Call):
                _settle(job.future, job.fn, self.engine)
                continue
            batch, stop = self._collect(job)
            with self._lock:
                self._waiting -= len(batch)
            self.on_batch(len(batch))
            try:
                self._run(batch)
            except Exception as e:  # a bug, not bad input: fail this batch, keep serving
                logger.exception("batch of %d failed", len(batch))
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(e)
        self.engine.close()

    def _collect(self, first: Query) -> tuple[list[Query], bool]:
        """The first query plus what arrives within max_wait (calls are run in between)."""
        batch, deadline = [first], time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            if isinstance(job, _Call):
                _settle(job.future, job.fn, self.engine)
            else:
                batch.append(job)
        return batch, False

    def _run(self, batch: list[Query]) -> None:
        t = time.perf_counter()
        gaussians = self._encode(batch)
        encode_ms = elapsed_ms(t)
        groups: dict[tuple, list[tuple[Query, tuple]]] = {}
        for q, g in zip(batch, gaussians):
            if isinstance(g, PcmeError):
                q.future.set_exception(g)
            else:
                groups.setdefault((q.modality, q.k, q.score, q.exact), []).append((q, g))
        for (modality, k, score, exact), members in groups.items():
            mu = np.stack([g[0] for _, g in members])
            lv = np.stack([g[1] for _, g in members])
            try:
                answers = self.engine.search_many(modality, mu, lv, k, score, exact)
            except PcmeError as e:
                for q, _ in members:
                    q.future.set_exception(e)
                continue
            for (q, (mu_q, lv_q, unknown)), (hits, timings, shortlist) in zip(members, answers):
                timings = {"queue_ms": round((t - q.queued) * 1000, 3), "encode_ms": encode_ms,
                           **timings, "batch": len(batch),
                           "total_ms": elapsed_ms(q.queued)}
                confidence, low = self.engine.confidence(QUERY_MODALITY[modality], lv_q)
                q.future.set_result(QueryResult(
                    q.label, modality, score, float(uncertainty(lv_q)), hits,
                    confidence=confidence, low_confidence=low, timings_ms=timings,
                    unknown_words=unknown, shortlist_size=shortlist))

    def _encode(self, batch: list[Query]) -> list:
        """(μ, log_var, unknown words) or the PcmeError, per query; texts in one forward pass."""
        out: list = [None] * len(batch)
        texts = [i for i, q in enumerate(batch) if q.text is not None]
        if texts:
            for i, g in zip(texts, self._encode_texts([batch[i].text for i in texts])):
                out[i] = g
        for i, q in enumerate(batch):
            if q.text is None:
                out[i] = _guard(self._gaussian, q)
        return out

    def _encode_texts(self, texts: list[str]) -> list:
        try:
            encoder = self.engine._encoder()
        except PcmeError as e:  # an index without a model: only Gaussian and item queries
            return [e] * len(texts)
        if hasattr(encoder, "encode_texts"):
            return encoder.encode_texts(texts)
        return [_guard(encoder.encode_text, t) for t in texts]  # encoders without a batch API

    def _gaussian(self, q: Query):
        if q.image is not None:
            return (*self.engine._encoder().encode_image(q.image), [])
        if q.item is not None:
            modality, item_id = q.item
            mu, lv = self.engine.reader.fetch(modality, np.array([item_id]))
            return mu[0], lv[0], []
        mu, lv = q.gaussian
        return mu, lv, []


def _guard(fn, *args):
    try:
        return fn(*args)
    except PcmeError as e:
        return e


def _settle(future: Future, fn, *args) -> None:
    try:
        future.set_result(fn(*args))
    except Exception as e:  # PcmeError or a bug: the caller turns it into a JSON error
        future.set_exception(e)

