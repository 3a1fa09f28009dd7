"""The named indexes a service holds, and their reload without downtime.

Each index has its own engine, micro-batcher (worker thread) and image store: an Entry. Reload
builds a complete new Entry beside the old one (the slow part: model and index load), then swaps
the name over in one assignment; the old batcher answers what it already queued and closes its
engine. A failed load leaves the old Entry serving and records why. The engines come from a
factory the caller hands in (cli.py wires the query encoder), so this package imports no model.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import PcmeError
from core.served_mc import draw_all_noise
from core.process import settle_heap
from core.scores import SCORES
from engine.search import uncertainty
from indexer.manifest import read_index_manifest
from service.batcher import MicroBatcher, check_options
from service.images import ImageStore

logger = logging.getLogger(__name__)


class NotFound(PcmeError):
    """An unknown index, item or image (HTTP 404)."""


@dataclass
class Entry:
    name: str
    index_dir: Path
    engine: object
    batcher: MicroBatcher
    images: ImageStore
    generation: str                 # changes with every rebuild: part of image URLs and ETags
    spread: dict                    # modality -> [1st, 99th] percentile of the items' mean σ²
    loaded_at: float = field(default_factory=time.time)

    def info(self) -> dict:
        m = self.engine.reader.manifest
        producer = m.get("producer", {})
        return {"name": self.name, "counts": m["counts"], "dim": m["dim"],
                "factory": m["factory"], "nprobe": m["nprobe"], "scores": list(SCORES),
                "augmented": m.get("augmented", {}), "created": m.get("created"),
                "generation": self.generation, "model_sha256": producer.get("checkpoint_sha256"),
                "dataset": producer.get("dataset"), "split": producer.get("split"),
                "text_queries": self.engine.encoder is not None,
                "uncertainty_range": self.spread}


class Registry:
    def __init__(self, indexes: dict[str, Path], factory: Callable[[Path], object],
                 image_roots: list[Path] | None = None, batcher_options: dict | None = None,
                 on_batch=None):
        if not indexes:
            raise PcmeError("serve: give at least one --index")
        self.dirs = {name: Path(d) for name, d in indexes.items()}
        self.factory, self.image_roots = factory, image_roots
        self.batcher_options, self.on_batch = batcher_options or {}, on_batch
        check_options(**self.batcher_options)   # a bad option fails before the server starts
        self.entries: dict[str, Entry] = {}
        self.errors: dict[str, str] = {}
        self.ready = threading.Event()
        self._reload_lock = threading.Lock()   # one reload at a time; queries never take it

    @property
    def default(self) -> str:
        return next(iter(self.dirs))

    def get(self, name: str | None) -> Entry:
        entry = self.entries.get(name or self.default)
        if entry is None:
            known = ", ".join(self.dirs)
            raise NotFound(f"index {name!r}: unknown (this service has {known})")
        return entry

    def load_all(self) -> None:
        """Start-up: load every index; ready only when all are in."""
        for name in self.dirs:
            try:
                self.entries[name] = self._load(name)
            except Exception as e:
                self.errors[name] = _reason(e)
                logger.error("index %s: cannot load: %s", name, self.errors[name])
                return
        settle_heap()   # core/process.py: no full collection pauses a query later
        self.ready.set()

    def reload(self, names: list[str] | None = None) -> dict[str, str | None]:
        """Reload `names` (default all); name -> None when swapped, else why it failed."""
        names = names or list(self.dirs)
        for name in names:
            if name not in self.dirs:
                raise NotFound(f"index {name!r}: unknown (this service has {', '.join(self.dirs)})")
        outcome, swapped = {}, False
        with self._reload_lock:
            for name in names:
                try:
                    if self._unchanged(name):  # same files: nothing to do (LMDB cannot reopen them)
                        outcome[name] = None
                        continue
                    entry = self._load(name)
                except Exception as e:
                    outcome[name] = self.errors[name] = _reason(e)
                    logger.error("reload %s failed, still serving the previous index: %s",
                                 name, outcome[name])
                    continue
                old, self.entries[name] = self.entries.get(name), entry
                self.errors.pop(name, None)
                outcome[name] = None
                if old is not None:   # finishes its queue, then closes the old engine
                    old.batcher.close(wait=True)
                    swapped = True
                logger.info("index %s reloaded from %s (%s)", name, entry.index_dir, entry.generation)
            if swapped:   # the old engines' objects were frozen: free them, freeze the new
                settle_heap()
        if all(n in self.entries for n in self.dirs):
            self.ready.set()
        return outcome

    def _unchanged(self, name: str) -> bool:
        entry = self.entries.get(name)
        return entry is not None and \
            _generation(read_index_manifest(self.dirs[name])) == entry.generation

    def close(self) -> None:
        for entry in self.entries.values():
            entry.batcher.close(wait=True)

    def _load(self, name: str) -> Entry:
        index_dir = self.dirs[name]
        t = time.perf_counter()
        engine = self.factory(index_dir)
        try:
            images = self._images(engine)
            _warm(engine)
        except BaseException:
            engine.close()
            raise
        generation = _generation(engine.reader.manifest)
        spread = _spread(engine.reader)
        batcher = MicroBatcher(engine, on_batch=self.on_batch, name=name, **self.batcher_options)
        logger.info("index %s: %s loaded in %.2f s", name, index_dir, time.perf_counter() - t)
        return Entry(name, index_dir, engine, batcher, images, generation, spread)

    def _images(self, engine) -> ImageStore:
        n = engine.reader.count("image")
        items = [item for _, item in engine.reader.meta("image", np.arange(n))] if n else []
        roots = self.image_roots or _common_root(items)
        return ImageStore(items, roots)


def _warm(engine) -> None:
    """Fill the engine's lazy caches now, on this thread, so the worker never builds them
    while serving: LMDB sub-databases, the IVF id maps, the shortlist bounds, the fixed
    Monte-Carlo noise behind every hit's p_match, the compiled search kernels (numba:
    compiled on a fresh install, loaded from its cache after)."""
    draw_all_noise(engine.batch.mc_samples, engine.reader.dim)
    for modality in ("image", "text"):
        if engine.reader.count(modality):
            mu, lv = engine.reader.fetch(modality, np.array([0]))
            for score in SCORES:   # first calls of each kernel are slow (torch dispatch)
                engine.search_many(modality, mu, lv, 1, score)
    if engine.encoder is not None and engine.reader.count("text"):
        (_, caption), = engine.reader.meta("text", np.array([0]))   # a text the model knows
        engine.encoder.encode_text(caption)


def _spread(reader, sample: int = 20_000) -> dict:
    """Where an item's uncertainty sits among its modality's: the page scales its σ² bars to
    this range (from an even sample of ids, so start-up stays fast on big indexes)."""
    out = {}
    for modality in ("image", "text"):
        n = reader.count(modality)
        if n:
            ids = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
            u = uncertainty(reader.fetch_log_var(modality, ids))
            out[modality] = [float(np.quantile(u, 0.01)), float(np.quantile(u, 0.99))]
    return out


def _common_root(items: list[str]) -> list[Path]:
    """Default image root: the deepest folder holding every image of the index. None when that
    is the filesystem root (then images are served only under an explicit --image-root)."""
    if not items:
        return []
    parents = [os.path.dirname(os.path.abspath(i)) for i in items]
    root = Path(os.path.commonpath(parents))
    if root == Path(root.anchor):
        logger.warning("images share no folder below %s: give --image-root to serve them", root)
        return []
    return [root]


def _generation(manifest: dict) -> str:
    """The build's id (indexer.manifest.build_stamp); for an index built before builds had one,
    its creation second, build time and counts."""
    if manifest.get("build_id"):
        return str(manifest["build_id"])[:12]
    key = f"{manifest.get('created')}:{manifest.get('build_s')}:{manifest.get('counts')}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, PcmeError) else f"{type(e).__name__}: {e}"
