"""Open an index directory for the engine: FAISS search on μ, exact μ and log σ² from LMDB.

Exact μ and log_var come from whole inverted lists (indexer/lists.py: a guaranteed shortlist
reads its probed lists; a read by id finds its row's list through `.where`), or, for an index
without inverted lists or a store older than format 5, from one LMDB row per id
(indexer/store.py, one `getmulti` call); FAISS only ranks. When faiss reports GPUs, each
modality's μ index is also copied to all of them at open time and serves `search`
(faiss_index.GpuSearch); the CPU copy stays for range search and for k beyond what the GPU
kernels select.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from core.errors import PcmeError
from indexer import augmented as aug
from indexer import faiss_index as fx
from indexer.lists import ListBlocks
from indexer.manifest import MODALITIES, read_index_manifest
from indexer.store import StoreReader

logger = logging.getLogger(__name__)


class IndexReader:
    def __init__(self, index_dir: Path, manifest: dict, indexes: dict, store: StoreReader):
        self.index_dir, self.manifest, self.dim = index_dir, manifest, manifest["dim"]
        self._indexes, self._store = indexes, store
        self._gpu = {m: g for m, g in ((m, fx.GpuSearch.create(i)) for m, i in indexes.items())
                     if g is not None}
        self._augmented: dict[tuple[str, str], faiss.Index] = {}
        self._lists: dict[str, ListBlocks | None] = {}

    def augmented(self, modality: str, score: str) -> faiss.Index | None:
        """The exact augmented-vector index for (modality, score) if the build made one."""
        return self._augmented.get((modality, score))

    def list_blocks(self, modality: str) -> ListBlocks | None:
        """The modality's rows grouped by inverted list (indexer/lists.py), or None: no IVF
        index, or a store written before format 3 (format 3 blocks lack the row scalars)."""
        if modality not in self._lists:
            store = self.manifest["store"]
            has = store.get("format") >= 3 and modality in store.get("lists", ()) \
                and self.count(modality) > 0
            self._lists[modality] = ListBlocks(
                self._store.env, modality, self._indexes[modality], self.dim,
                self.manifest["nprobe"][modality], row_stats=store["format"] >= 4,
                by_id=store["format"] >= 5,
                codes=store["format"] >= 6 and modality in store.get("mu_codes", ())) \
                if has else None
        return self._lists[modality]

    def _rows_in_blocks(self, modality: str) -> ListBlocks | None:
        """The list blocks when they are the only copy of the rows (format 5), else None."""
        blocks = self.list_blocks(modality)
        return blocks if blocks is not None and blocks.where is not None else None

    def variance_stats(self, modality: str) -> dict | None:
        """Global σ ranges recorded at build time (None for indexes built before them)."""
        return self.manifest.get("variance_stats", {}).get(modality)

    @classmethod
    def open(cls, index_dir: Path) -> "IndexReader":
        index_dir = Path(index_dir)
        manifest = read_index_manifest(index_dir)
        dim, counts, store_file = manifest["dim"], manifest["counts"], manifest["store"]["file"]
        indexes = {m: _read_faiss(index_dir / f"{m}.faiss", dim, n) for m, n in counts.items() if n}
        blocks = manifest["store"].get("format") >= 3 and bool(manifest["store"].get("lists"))
        reader = cls(index_dir, manifest, indexes,
                     StoreReader(index_dir / store_file, dim, readahead=blocks))
        for m, scores in manifest.get("augmented", {}).items():
            for score in scores:
                reader._augmented[m, score] = _read_faiss(
                    index_dir / aug.file_name(m, score), aug.aug_dim(score, dim), counts[m])
        return reader

    def count(self, modality: str) -> int:
        _check_modality(modality)
        return int(self.manifest["counts"].get(modality, 0))

    def search(self, modality: str, queries: np.ndarray, n: int, nprobe: int | None = None,
               min_fill: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-n by inner product on μ: (ids [Q, n'], ip [Q, n']) with n' = min(n,
        count). Rows IVF left with fewer than `min_fill` hits (default: n) are searched again
        with more lists; by default no -1 id comes back. With min_fill < n a row may end in -1
        ids: then it holds every item of the lists it probed (the engine's prefetch uses that)."""
        queries = self._check_queries(queries)
        if n < 1:
            raise PcmeError(f"search: n must be >= 1, got {n}")
        n = min(n, self.count(modality))
        if n == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        index = self._indexes[modality]
        nprobe = nprobe or self.manifest["nprobe"][modality]
        gpu = self._gpu.get(modality)
        if gpu is not None and gpu.can_search(n, nprobe):
            ip, ids = gpu.search(queries, n, nprobe)
        else:
            ip, ids = fx.search(index, queries, n, nprobe)
        ivf = fx.ivf_of(index)
        need = n if min_fill is None else min(min_fill, n)
        while ivf is not None and nprobe and nprobe < ivf.nlist \
                and ((ids >= 0).sum(axis=1) < need).any():
            nprobe = min(2 * nprobe, ivf.nlist)  # nprobe = nlist scans all n rows: never short
            short = np.flatnonzero((ids >= 0).sum(axis=1) < need)
            ip[short], ids[short] = fx.search(index, queries[short], n, nprobe)
        return _trim_missing(ids, ip) if min_fill is None else (ids, ip)

    def range_search(self, modality: str, query: np.ndarray, threshold: float,
                     nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All items with ⟨query, μ⟩ > threshold (approximate for IVF: only the probed lists)."""
        (query,) = self._check_queries(np.asarray(query)[None])
        nprobe = nprobe or self.manifest["nprobe"].get(modality)
        return fx.range_search(self._indexes[modality], query, threshold, nprobe)

    def fetch(self, modality: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(μ float32 [M, D], log_var float32 [M, D]) for `ids`; store reads in one transaction."""
        ids = self._check_ids(modality, ids)
        blocks = self._rows_in_blocks(modality)
        return blocks.fetch(ids) if blocks is not None else self._store.vectors(modality, ids)

    def fetch_log_var(self, modality: str, ids: np.ndarray) -> np.ndarray:
        return self.fetch(modality, ids)[1]

    def meta(self, modality: str, ids: np.ndarray) -> list[tuple[int, str]]:
        """(group, item) per id."""
        return self._store.meta(modality, self._check_ids(modality, ids))

    def all_vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, μ, log_var) of every item, in id order: for exact search and evaluation."""
        n = self.count(modality)
        if n == 0:
            empty = np.zeros((0, self.dim), np.float32)
            return np.zeros(0, np.int64), empty, empty.copy()
        blocks = self._rows_in_blocks(modality)
        if blocks is None:
            mu, log_var = self._store.scan(modality, n)
            return np.arange(n, dtype=np.int64), mu, log_var
        mu, log_var = np.empty((n, self.dim), np.float32), np.empty((n, self.dim), np.float32)
        for ids, m, lv in blocks.scan():
            mu[ids], log_var[ids] = m, lv
        return np.arange(n, dtype=np.int64), mu, log_var

    def vector_blocks(self, modality: str, block: int):
        """(ids, μ, log_var) of about `block` items at a time, each item once, in storage
        order (consecutive ids, or whole inverted lists): exhaustive scoring in bounded memory."""
        n = self.count(modality)
        blocks = self._rows_in_blocks(modality)
        if blocks is None:
            for start in range(0, n, block):
                yield (np.arange(start, min(start + block, n)),
                       *self._store.scan(modality, n, start, start + block))
            return
        pending, held = [], 0
        for part in blocks.scan():
            pending.append(part)
            held += len(part[0])
            if held >= block:
                yield tuple(np.concatenate(column) for column in zip(*pending))
                pending, held = [], 0
        if pending:
            yield tuple(np.concatenate(column) for column in zip(*pending))

    def close(self) -> None:
        for blocks in self._lists.values():
            if blocks is not None:
                blocks.close()
        self._store.close()
        self._indexes, self._augmented, self._gpu, self._lists = {}, {}, {}, {}

    def __enter__(self) -> "IndexReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise PcmeError(f"{self.index_dir}: queries have shape {queries.shape}, "
                            f"the index expects (Q, {self.dim})")
        return np.ascontiguousarray(queries, dtype=np.float32)

    def _check_ids(self, modality: str, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        n = self.count(modality)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise PcmeError(f"{self.index_dir}: ids must be a 1-D integer array, got "
                            f"{ids.dtype} {ids.shape}")
        bad = (ids < 0) | (ids >= n)
        if bad.any():
            raise PcmeError(f"{self._store.path}: no {modality} id {int(ids[bad][0])} "
                            f"(ids are 0..{n - 1})")
        return ids.astype(np.int64)


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise PcmeError(f"modality {modality!r}: expected one of {MODALITIES}")


def _read_faiss(path: Path, dim: int, count: int) -> faiss.Index:
    if not path.is_file():
        raise PcmeError(f"{path}: FAISS index file is missing")
    try:
        # SAME_DIR: a distributed build's inverted lists live in `<modality>.ivfdata` beside
        # the index file (merged on disk), found there wherever the directory has moved
        with _stdout_to_stderr(path.with_suffix(".ivfdata").exists()):
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:
        raise PcmeError(f"{path}: unreadable FAISS index ({str(e).splitlines()[-1][:200]})") from None
    if index.d != dim or index.ntotal != count:
        raise PcmeError(f"{path}: holds {index.ntotal} vectors of dim {index.d}, manifest says "
                        f"{count} of dim {dim}")
    return index


@contextmanager
def _stdout_to_stderr(active: bool):
    """FAISS prints a note on C stdout when it relocates on-disk lists; `query --json` owns
    stdout, so while such an index is read, fd 1 points at stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _trim_missing(ids: np.ndarray, ip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop trailing columns where some row found fewer hits (-1), so no -1 id leaks out."""
    valid = int((ids >= 0).sum(axis=1).min())
    if valid < ids.shape[1]:
        logger.warning("search returned only %d of %d hits for some queries", valid, ids.shape[1])
        ids, ip = ids[:, :valid], ip[:, :valid]
    return ids, ip
