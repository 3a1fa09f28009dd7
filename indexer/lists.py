"""List blocks: the store's rows grouped by IVF inverted list (store formats 3 to 6).

A guaranteed shortlist lies inside the query's probed inverted lists (the bound of
indexer/variance.py only ever admits items the ANN stage could return), so the engine reads
those lists whole instead of the shortlist id by id: one LMDB value per list,

  `<modality>.lists`  key: list number, 4-byte big-endian; value: the list's rows as one
                      block (indexer/blocks.py: ids, μ, log_var, the row bounds' scalars
                      from format 4, μ's 16-bit codes from format 6)
  `<modality>.where`  (format 5) one value under key 0: int32 list number [N], then int32
                      position in that list [N], by id (80 MB at 10M: one zero-copy view)

At 1M × 256 a list is ~1,000 rows (1.5 MiB, contiguous overflow pages): two reads per query
instead of ~800 B-tree lookups, and the pages a query touches are few and sequential, which
is what matters once the store outgrows RAM. Formats 3 and 4 also kept every row by id
(`.vec`), so the store held each row twice (35 GB at 10M × 256, more than this machine's RAM:
most queries then read their lists from the disk). Format 5 keeps the rows only here: a read
by id (hits, the service's item lookups) finds the row through `.where` (8 bytes per id), and
exhaustive search walks the blocks (`ListBlocks.scan`). Indexes without inverted lists (Flat)
have no blocks and keep `.vec`; format-2 stores open without blocks and the engine takes the
id-by-id path.

Format 6 adds 16-bit codes of μ to the blocks of modalities up to ~4M rows at 256-d, which
the row bounds read instead of float32 μ (indexer/blocks.py).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import faiss
import lmdb
import numpy as np

from core.errors import PcmeError
from indexer import faiss_index as fx
from indexer.blocks import Block, codes_for, decode_block, encode_block, row_scalar_count
from indexer.store import encode_ids, row_bytes

logger = logging.getLogger(__name__)

COMMIT_BYTES = 256 << 20   # blocks per write transaction, by size


def list_key(number: int) -> bytes:
    return int(number).to_bytes(4, "big")



def list_ids(index: faiss.Index, number: int) -> np.ndarray:
    """Ids of one inverted list of an IVF index (a copy)."""
    invlists = fx.ivf_of(index).invlists
    n = invlists.list_size(number)
    if n == 0:
        return np.zeros(0, np.int64)
    return faiss.rev_swig_ptr(invlists.get_ids(number), n).astype(np.int64)


def write_list_blocks(store_path: Path, rows_path: Path, modality: str, index: faiss.Index,
                      dim: int) -> int:
    """Write `<modality>.lists` and `<modality>.where` into the store at `store_path` from the
    by-id rows `<modality>.vec` of the LMDB at `rows_path` (complete, written by the add pass)
    and the inverted lists of `index`, with μ codes when codes_for(ntotal, dim). Returns the
    rows written, which must equal ntotal."""
    codes = codes_for(index.ntotal, dim)
    ivf = fx.ivf_of(index)
    rows_env = lmdb.open(str(rows_path), readonly=True, lock=False, max_dbs=8, subdir=True,
                         readahead=False)   # rows are read by id, in list order: random
    # writemap: LMDB writes the blocks straight into the file's pages instead of through
    # malloc'd copies; it then sizes the file to the whole map, so the map is what is used so
    # far plus the blocks, each rounded up to whole pages. The write is disk-bound either way
    # (1M x 256: ~20 s for 1.5 GB at ~80 MB/s here)
    env = lmdb.open(str(store_path), map_size=(Path(store_path) / "data.mdb").stat().st_size,
                    max_dbs=8, subdir=True, sync=False, metasync=False, writemap=True)
    page = env.stat()["psize"]
    used = (env.info()["last_pgno"] + 1) * page
    blocks_bytes = (index.ntotal * (8 + 8 + 4 * row_scalar_count(codes) + 2 * dim * codes
                                    + row_bytes(dim))
                    + ivf.nlist * (3 * page + 4 * (dim + 1)))
    env.set_mapsize(int(1.02 * (used + blocks_bytes)) + (16 << 20))
    home = np.full(index.ntotal, -1, np.int32)       # id -> (list, position): `.where`
    place = np.zeros(index.ntotal, np.int32)
    rows, pending, size = 0, [], 0
    try:
        vec = rows_env.open_db(f"{modality}.vec".encode(), create=False)
        blocks = env.open_db(f"{modality}.lists".encode())

        def flush():
            _put_growing(env, blocks, pending)
            pending.clear()

        for number in range(ivf.nlist):
            ids = np.sort(list_ids(index, number))
            if not len(ids):
                continue
            with rows_env.begin() as txn:
                values = [v for _, v in txn.cursor(vec).getmulti(encode_ids(ids))]
            if len(values) != len(ids):
                raise ValueError(f"{rows_path}: {modality}.vec lacks ids of inverted list {number}")
            raw = np.frombuffer(b"".join(values), np.uint8).reshape(len(ids), row_bytes(dim))
            block = encode_block(ids, raw[:, :4 * dim].view(np.float32),
                                 raw[:, 4 * dim:].view(np.float16), codes=codes)
            home[ids], place[ids] = number, np.arange(len(ids), dtype=np.int32)
            pending.append((list_key(number), block))
            rows, size = rows + len(ids), size + len(block)
            if size >= COMMIT_BYTES:
                flush()
                size = 0
        flush()
        if rows != index.ntotal or (home < 0).any():
            raise ValueError(f"{store_path}: list blocks hold {rows} rows, the index {index.ntotal}")
        where = env.open_db(f"{modality}.where".encode())
        _put_growing(env, where, [(list_key(0), home.tobytes() + place.tobytes())])
        env.sync(True)
    finally:
        env.close()
        rows_env.close()
    logger.info("%s: %d rows in %d list blocks", modality, rows, ivf.nlist)
    return rows


def _put_growing(env, db, items: list) -> None:
    while True:
        try:
            with env.begin(write=True) as txn:
                txn.cursor(db).putmulti(items, append=True)
            return
        except lmdb.MapFullError:
            env.set_mapsize(2 * env.info()["map_size"])


class ListBlocks:
    """Reads the list blocks of one modality: which lists a query probes (the IVF quantizer),
    then those lists' rows, zero-copy. `by_id` (format 5): the rows live only here, and
    `fetch`/`scan` serve reads by id and exhaustive passes.

    A block is decoded once per process and kept (numpy views into LMDB's map, a few hundred
    bytes each): one read transaction stays open for the reader's life, which is safe because
    an index directory is never written once built. Looking a ~1 MB block up again cost ~10 µs
    (B-tree walk and overflow pages), which a read by id of k hits in k lists paid per hit."""

    def __init__(self, env, modality: str, index: faiss.Index, dim: int, nprobe: int,
                 row_stats: bool = True, by_id: bool = False, codes: bool = False):
        self.env, self.dim, self.nprobe, self.row_stats = env, dim, nprobe, row_stats
        self.codes = codes
        self.modality, self.ivf = modality, fx.ivf_of(index)
        self.db = env.open_db(f"{modality}.lists".encode(), create=False)
        self.where = env.open_db(f"{modality}.where".encode(), create=False) if by_id else None
        self._blocks: dict[int, Block] = {}
        self._where: np.ndarray | None = None
        self._centroids: np.ndarray | None = None
        self._sizes: np.ndarray | None = None
        self._txn = None
        self._lock = threading.Lock()     # a transaction serves one thread at a time

    def probe(self, queries: np.ndarray, nprobe: int | None = None) -> np.ndarray:
        """[Q, nprobe] list numbers, nearest centroid first (-1 where there are fewer lists)."""
        nprobe = min(nprobe or self.nprobe, self.ivf.nlist)
        _, lists = self.ivf.quantizer.search(np.ascontiguousarray(queries, np.float32), nprobe)
        return lists

    def centroid_keys(self, queries: np.ndarray) -> np.ndarray | None:
        """[Q, nlist] float32, higher = nearer: each query against every centroid of a flat
        quantizer in one BLAS product (inner product, or minus the squared L2 distance), from
        which a batch picks its lists (engine/probe.py); None for a quantizer that is not flat
        (HNSW), whose own search() then decides. faiss' quantizer.search sends small problems
        (Q × nlist below its threshold: 64 × 1,024 here) to a per-query scan: 0.7–1.3 ms for 64
        queries against 0.25–0.3 ms for this product."""
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat):
            return None
        if self._centroids is None:
            self._centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
        q = np.ascontiguousarray(queries, np.float32)
        if quantizer.metric_type == faiss.METRIC_INNER_PRODUCT:
            return faiss.pairwise_distances(q, self._centroids, faiss.METRIC_INNER_PRODUCT)
        return -faiss.pairwise_distances(q, self._centroids, faiss.METRIC_L2)

    def sizes(self, lists: np.ndarray) -> np.ndarray:
        """Rows in each of `lists` (0 for -1): the index never changes once built, so the
        sizes are read from faiss once."""
        if self._sizes is None:
            invlists = self.ivf.invlists
            self._sizes = np.array([invlists.list_size(n) for n in range(self.ivf.nlist)] + [0],
                                   np.int64)   # the extra 0 answers -1
        return self._sizes[lists]

    def _value(self, key: bytes, db):
        with self._lock:
            if self._txn is None:
                self._txn = self.env.begin(buffers=True)
            return self._txn.get(key, db=db)

    def read(self, number: int) -> Block:
        """The rows of list `number` (views, valid until the reader closes)."""
        block = self._blocks.get(number)
        if block is None:
            value = self._value(list_key(number), self.db)
            block = self._blocks[number] = decode_block(value, self.dim, self.row_stats,
                                                        self.codes) \
                if value is not None else Block(np.zeros(0, np.int64),
                                                np.zeros((0, self.dim), np.float32),
                                                np.zeros((0, self.dim), np.float16))
        return block

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(list number, position in it) of each id, from `.where` (a view, read once)."""
        if self._where is None:
            value = self._value(list_key(0), self.where)
            self._where = (np.frombuffer(value, np.int32) if value is not None
                           else np.zeros(0, np.int32)).reshape(2, -1)
        if len(ids) and ids.max() >= self._where.shape[1]:
            raise PcmeError(f"{self.env.path()}: {self.modality}.where has no entry for id "
                            f"{int(ids.max())}")
        return self._where[0, ids], self._where[1, ids]

    def fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(μ float32 [M, D], log_var float32 [M, D]) of `ids` (in range, any order): their
        places from `.where`, then each of their lists read once."""
        mu = np.empty((len(ids), self.dim), np.float32)
        lv = np.empty((len(ids), self.dim), np.float32)
        home, place = self._locate(ids)
        for number, at in _groups(home):
            block, rows = self.read(number), place[at]
            try:
                mu[at], lv[at] = block.mu[rows], block.log_var[rows]
            except IndexError:
                raise PcmeError(f"{self.env.path()}: {self.modality}.where points past the end "
                                f"of list {number} (a damaged store: rebuild the index)") from None
        return mu, lv

    def scan(self):
        """(ids, μ float32, log_var float32) copies of every non-empty block, in list order:
        every row once (the exhaustive pass of format 5). Not kept: a pass reads them all."""
        with self.env.begin(buffers=True) as txn:
            for number in range(self.ivf.nlist):
                value = txn.get(list_key(number), db=self.db)
                if value is not None:
                    b = decode_block(value, self.dim, self.row_stats, self.codes,
                                     derive=False)
                    yield b.ids.copy(), b.mu.copy(), b.log_var.astype(np.float32)

    def close(self) -> None:
        with self._lock:
            if self._txn is not None:
                self._txn.abort()
            self._txn, self._blocks, self._where = None, {}, None


def _groups(keys: np.ndarray):
    """(key, positions of that key) for each distinct value of `keys`, in increasing order."""
    order = np.argsort(keys, kind="stable")
    values, starts = np.unique(keys[order], return_index=True)
    for value, a, z in zip(values, starts, np.r_[starts[1:], len(keys)]):
        yield int(value), order[a:z]
