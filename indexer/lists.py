"""List blocks: the store's rows grouped by IVF inverted list (store formats 3 and 4).

A guaranteed shortlist lies inside the query's probed inverted lists (the bound of
indexer/variance.py only ever admits items the ANN stage could return), so the engine reads
those lists whole instead of the shortlist id by id: one LMDB value per list,

  `<modality>.lists`  key: list number, 4-byte big-endian
                      value: n int64 ids (ascending), then μ float32 [n, D], then log_var
                      float16 [n, D] (columns, so each is one zero-copy numpy view);
                      format 4 appends the row bounds' scalars (engine/row_bounds.py):
                      rho, lv_sum float32 [n], then lv_ref float32 [D], rho0 float32

At 1M × 256 a list is ~1,000 rows (1.5 MiB, contiguous overflow pages): two reads per query
instead of ~800 B-tree lookups, and the pages a query touches are few and sequential, which
is what matters once the store outgrows RAM. The `.vec` rows stay the by-id access (hits,
exact search, eval); a block is a second copy of them, so the store is about twice the size.
Indexes without inverted lists (Flat) have no blocks; format-2 stores open without them and
the engine takes the id-by-id path.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import lmdb
import numpy as np

from indexer import faiss_index as fx
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


def row_scalars(log_var: np.ndarray) -> tuple[np.ndarray, ...]:
    """(rho [n], lv_sum [n], lv_ref [D], rho0 [1]) of a block's stored float16 log_var, for
    engine/row_bounds.py: lv_ref is the per-dimension mean log v (b_d = exp(lv_ref_d));
    rho_i = exp(max_d(lv_i,d − lv_ref_d)) rounded UP, so v_i,d ≤ rho_i·b_d holds;
    lv_sum_i = Σ_d lv_i,d; rho0 the block's median rho."""
    lv = log_var.astype(np.float64)
    ref = lv.mean(axis=0).astype(np.float32)
    rho = _rounded(np.exp((lv - ref.astype(np.float64)).max(axis=1)) * (1 + 1e-12), np.inf)
    return rho, lv.sum(axis=1).astype(np.float32), ref, np.median(rho).astype(np.float32)[None]


def _rounded(x: np.ndarray, towards: float) -> np.ndarray:
    """float64 -> float32, rounded towards +inf or -inf instead of to nearest."""
    y = x.astype(np.float32)
    off = y.astype(np.float64) < x if towards > 0 else y.astype(np.float64) > x
    return np.where(off, np.nextafter(y, np.float32(towards)), y).astype(np.float32)


def encode_block(ids: np.ndarray, mu: np.ndarray, log_var: np.ndarray,
                 row_stats: bool = True) -> bytes:
    """A block's value; `row_stats=False` writes the format-3 layout (no scalars)."""
    parts = [np.ascontiguousarray(ids, "<i8"), np.ascontiguousarray(mu, np.float32),
             np.ascontiguousarray(log_var, np.float16)]
    if row_stats:
        parts += row_scalars(parts[2])
    return b"".join(p.tobytes() for p in parts)


@dataclass
class Block:
    """One inverted list: ids [n], μ float32 [n, D], log_var float16 [n, D] (views), and in
    format 4 the row bounds' scalars (row_scalars; None in format 3)."""
    ids: np.ndarray
    mu: np.ndarray
    log_var: np.ndarray
    rho: np.ndarray | None = None
    lv_sum: np.ndarray | None = None
    lv_ref: np.ndarray | None = None
    rho0: float | None = None


ROW_SCALARS = 2   # float32 scalars per row in format 4


def decode_block(value, dim: int, row_stats: bool = False) -> Block:
    raw = np.frombuffer(value, np.uint8)
    per_row = 8 + row_bytes(dim) + (4 * ROW_SCALARS if row_stats else 0)
    fixed = 4 * (dim + 1) if row_stats else 0
    n = (len(raw) - fixed) // per_row
    if n < 0 or n * per_row + fixed != len(raw):
        raise ValueError(f"list block of {len(raw)} bytes is not whole rows of dim {dim}")
    ids = raw[:8 * n].view("<i8")
    at = 8 * n + 4 * n * dim
    mu = raw[8 * n:at].view(np.float32).reshape(n, dim)
    log_var = raw[at:at + 2 * n * dim].view(np.float16).reshape(n, dim)
    if not row_stats:
        return Block(ids, mu, log_var)
    at += 2 * n * dim
    scalars = raw[at:at + 4 * ROW_SCALARS * n].view(np.float32).reshape(ROW_SCALARS, n)
    tail = raw[at + 4 * ROW_SCALARS * n:].view(np.float32)
    return Block(ids, mu, log_var, *scalars, tail[:dim], float(tail[dim]))


def write_list_blocks(store_path: Path, modality: str, index: faiss.Index, dim: int) -> int:
    """Write `<modality>.lists` into the store at `store_path` from the rows of its
    `<modality>.vec` (already complete) and the inverted lists of `index`. Returns the rows
    written, which must equal the index's ntotal."""
    ivf = fx.ivf_of(index)
    # writemap: LMDB writes the blocks straight into the file's pages instead of through
    # malloc'd copies; it then sizes the file to the whole map, so the map is what is used so
    # far plus the blocks, each rounded up to whole pages. The write is disk-bound either way
    # (1M x 256: ~20 s for 1.5 GB at ~80 MB/s here)
    env = lmdb.open(str(store_path), map_size=(Path(store_path) / "data.mdb").stat().st_size,
                    max_dbs=8, subdir=True, sync=False, metasync=False, writemap=True)
    page = env.stat()["psize"]
    used = (env.info()["last_pgno"] + 1) * page
    blocks_bytes = (index.ntotal * (8 + 4 * ROW_SCALARS + row_bytes(dim))
                    + ivf.nlist * (3 * page + 4 * (dim + 1)))
    env.set_mapsize(int(1.02 * (used + blocks_bytes)) + (16 << 20))
    rows, pending, size = 0, [], 0
    try:
        vec = env.open_db(f"{modality}.vec".encode())
        blocks = env.open_db(f"{modality}.lists".encode())

        def flush():
            _put_growing(env, blocks, pending)
            pending.clear()

        for number in range(ivf.nlist):
            ids = np.sort(list_ids(index, number))
            if not len(ids):
                continue
            with env.begin() as txn:
                values = [v for _, v in txn.cursor(vec).getmulti(encode_ids(ids))]
            if len(values) != len(ids):
                raise ValueError(f"{store_path}: {modality}.vec lacks ids of inverted list {number}")
            raw = np.frombuffer(b"".join(values), np.uint8).reshape(len(ids), row_bytes(dim))
            block = encode_block(ids, raw[:, :4 * dim].view(np.float32),
                                 raw[:, 4 * dim:].view(np.float16))
            pending.append((list_key(number), block))
            rows, size = rows + len(ids), size + len(block)
            if size >= COMMIT_BYTES:
                flush()
                size = 0
        flush()
        env.sync(True)
    finally:
        env.close()
    if rows != index.ntotal:
        raise ValueError(f"{store_path}: list blocks hold {rows} rows, the index {index.ntotal}")
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
    then those lists' rows, zero-copy, inside one read transaction."""

    def __init__(self, env, modality: str, index: faiss.Index, dim: int, nprobe: int,
                 row_stats: bool = True):
        self.env, self.dim, self.nprobe, self.row_stats = env, dim, nprobe, row_stats
        self.ivf = fx.ivf_of(index)
        self.db = env.open_db(f"{modality}.lists".encode(), create=False)

    def probe(self, queries: np.ndarray, nprobe: int | None = None) -> np.ndarray:
        """[Q, nprobe] list numbers, nearest centroid first (-1 where there are fewer lists)."""
        nprobe = min(nprobe or self.nprobe, self.ivf.nlist)
        _, lists = self.ivf.quantizer.search(np.ascontiguousarray(queries, np.float32), nprobe)
        return lists

    def sizes(self, lists: np.ndarray) -> np.ndarray:
        invlists = self.ivf.invlists
        return np.array([invlists.list_size(int(n)) if n >= 0 else 0 for n in lists.ravel()],
                        np.int64).reshape(lists.shape)

    @contextmanager
    def reading(self):
        """Yields read(number) -> Block; the blocks' arrays are valid only inside the with."""
        with self.env.begin(buffers=True) as txn:
            cache: dict[int, Block] = {}

            def read(number: int) -> Block:
                if number not in cache:
                    value = txn.get(list_key(number), db=self.db)
                    cache[number] = (decode_block(value, self.dim, self.row_stats)
                                     if value is not None else
                                     Block(np.zeros(0, np.int64),
                                           np.zeros((0, self.dim), np.float32),
                                           np.zeros((0, self.dim), np.float16)))
                return cache[number]
            yield read
