"""List blocks: the store's rows grouped by IVF inverted list (store formats 3 to 6).

A guaranteed shortlist lies inside the query's probed inverted lists (the bound of
indexer/variance.py only ever admits items the ANN stage could return), so the engine reads
those lists whole instead of the shortlist id by id: one LMDB value per list,

  `<modality>.lists`  key: list number, 4-byte big-endian
                      value: n int64 ids (ascending), then μ float32 [n, D], then log_var
                      float16 [n, D] (columns, so each is one zero-copy numpy view);
                      format 4 appends the row bounds' scalars (engine/row_bounds.py):
                      rho, lv_sum float32 [n], then lv_ref float32 [D], rho0 float32;
                      format 6 also each row's μ code (mu_codes): scale, err float32 [n]
                      after lv_sum, and the codes int16 [n, D] before lv_ref
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

Format 6 adds a 16-bit copy of μ for the row bounds: a guaranteed query reads every probed
row's μ once to bound it and only ~50 rows exactly, so the bound pass's 1 KB of float32 a
row was most of a query's memory traffic (the same 2 MB a μ-only FAISS scan reads). The codes
halve it; the bound stays exact by taking off each row's stored quantisation error (see
engine/row_bounds.py). Exact scores and hits still read the float32 μ. The store grows by
2·D + 8 bytes a row (+0.5 GB at 1M × 256), so a modality gets codes only while its store stays
within CODES_MAX_STORE (codes_for): at 10M × 256 they took the store from 15.3 to 20.3 GB on a
24 GB machine and the list blocks fell out of the page cache (elk p50 2.32 → 4.13 ms). Blocks
without codes (formats 4 and 5, and larger modalities) are bounded from float32 μ itself: the
same bound with scale 1 and error 0, the arithmetic of format 5.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import lmdb
import numpy as np

from core.errors import PcmeError
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


CODE_MAX = 32767   # μ codes: int16, symmetric
CODES_MAX_STORE = 8 << 30   # bytes of list blocks up to which a modality gets μ codes


def codes_for(n: int, dim: int) -> bool:
    """Whether a modality of n rows of dim D gets μ codes in its blocks: while its blocks with
    codes (ids, μ, log_var, 4 scalars and the codes: 8D + 24 bytes a row) stay within
    CODES_MAX_STORE, ~4M rows at 256-d, so they stay in the page cache of a 16-24 GB machine
    beside the FAISS index. A function of the counts alone, so every machine of a build
    decides the same."""
    return n * (8 * dim + 24) <= CODES_MAX_STORE


def mu_codes(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int16 [n, D], scale float32 [n], err float32 [n]) of float32 μ rows: each row
    scaled by its own largest |μ| to ±CODE_MAX, so μ̂_i = scale_i·codes_i, and
    err_i ≥ ‖μ_i − μ̂_i‖ (computed in float64, rounded up). An all-zero row: scale 1, error 0."""
    mu = np.asarray(mu, np.float32)
    top = np.abs(mu).max(axis=1) if mu.size else np.zeros(len(mu), np.float32)
    scale = np.where(top > 0, top.astype(np.float64) / CODE_MAX, 1.0).astype(np.float32)
    q = mu / scale[:, None]
    codes = np.clip(np.rint(q, out=q), -CODE_MAX, CODE_MAX, out=q).astype(np.int16)
    rest = mu.astype(np.float64)
    rest -= codes * scale.astype(np.float64)[:, None]   # exact products: 15 + 24 bits
    err = np.sqrt(np.einsum("nd,nd->n", rest, rest)) * (1 + 1e-6)
    return codes, scale, _rounded(err, np.inf)


def encode_block(ids: np.ndarray, mu: np.ndarray, log_var: np.ndarray,
                 row_stats: bool = True, codes: bool = True) -> bytes:
    """A block's value: format 6; `codes=False` the format-4/5 layout, `row_stats=False` the
    format-3 one (neither scalars nor codes)."""
    parts = [np.ascontiguousarray(ids, "<i8"), np.ascontiguousarray(mu, np.float32),
             np.ascontiguousarray(log_var, np.float16)]
    if row_stats:
        rho, lv_sum, ref, rho0 = row_scalars(parts[2])
        parts += [rho, lv_sum]
        if codes:
            code, scale, err = mu_codes(parts[1])
            parts += [scale, err, code]
        parts += [ref, rho0]
    return b"".join(p.tobytes() for p in parts)


@dataclass
class Block:
    """One inverted list: ids [n], μ float32 [n, D], log_var float16 [n, D] (views), and from
    format 4 the row bounds' scalars (row_scalars), what the bound reads for μ (its 16-bit
    codes where format 6 stored them, else μ itself) and, derived when read, each row's
    geometric-mean variance, squared norm and variance sum (None in format 3)."""
    ids: np.ndarray
    mu: np.ndarray
    log_var: np.ndarray
    rho: np.ndarray | None = None
    lv_sum: np.ndarray | None = None
    lv_ref: np.ndarray | None = None
    rho0: float | None = None
    geo: np.ndarray | None = None    # exp(lv_sum / D) float64: each row's geometric-mean variance
    sq_norm: np.ndarray | None = None   # ‖μ_i‖² float64
    var_sum: np.ndarray | None = None   # Σ_d v_i,d float64
    codes: np.ndarray | None = None     # μ ≈ scale·codes, int16 [n, D] (mu_codes), or μ
    code_scale: np.ndarray | None = None
    code_err: np.ndarray | None = None
    # what the compiled bound reads, packed (each array handed to numba costs ~1 µs a call):
    terms: np.ndarray | None = None     # float32 [4, n]: rho, lv_sum, code_scale, code_err
    ref: np.ndarray | None = None       # float32 [D + 1]: lv_ref, rho0
    lv_bits: np.ndarray | None = None   # log_var's float16 bits (uint16 view)


def row_scalar_count(codes: bool) -> int:
    """float32 scalars per row: rho, lv_sum (format 4), and the codes' scale, err (format 6)."""
    return 4 if codes else 2


def decode_block(value, dim: int, row_stats: bool = False, codes: bool = False,
                 derive: bool = True) -> Block:
    """A block's views; `row_stats`: format 4 or later, `codes`: format 6 (stored codes);
    `derive=False`: ids, μ and log_var only (a pass that reads every row once)."""
    raw = np.frombuffer(value, np.uint8)
    scalars_n = row_scalar_count(codes) if row_stats else 0
    per_row = 8 + row_bytes(dim) + 4 * scalars_n + (2 * dim if codes else 0)
    fixed = 4 * (dim + 1) if row_stats else 0
    n = (len(raw) - fixed) // per_row
    if n < 0 or n * per_row + fixed != len(raw):
        raise ValueError(f"list block of {len(raw)} bytes is not whole rows of dim {dim}")
    ids = raw[:8 * n].view("<i8")
    at = 8 * n + 4 * n * dim
    mu = raw[8 * n:at].view(np.float32).reshape(n, dim)
    log_var = raw[at:at + 2 * n * dim].view(np.float16).reshape(n, dim)
    if not (row_stats and derive):
        return Block(ids, mu, log_var)
    at += 2 * n * dim
    scalars = raw[at:at + 4 * scalars_n * n].view(np.float32).reshape(scalars_n, n)
    at += 4 * scalars_n * n
    if codes:
        code = raw[at:at + 2 * n * dim].view(np.int16).reshape(n, dim)
        at += 2 * n * dim
        terms = scalars
    else:   # no codes: the bound reads float32 μ, as scale 1 and error 0
        code = mu
        terms = np.stack([scalars[0], scalars[1], np.ones(n, np.float32),
                          np.zeros(n, np.float32)])
    tail = raw[at:].view(np.float32)
    # per-row terms the engine reads on every query, computed once per decoded block
    geo = np.exp(scalars[1].astype(np.float64) / dim)
    sq_norm = np.einsum("nd,nd->n", mu, mu, dtype=np.float64)
    var_sum = np.exp(log_var.astype(np.float32)).sum(axis=1, dtype=np.float64)
    return Block(ids, mu, log_var, terms[0], terms[1], tail[:dim], float(tail[dim]), geo,
                 sq_norm, var_sum, code, terms[2], terms[3], terms, tail[:dim + 1],
                 log_var.view(np.uint16))


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
        which a batch picks its lists (engine/batch.py); None for a quantizer that is not flat
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
