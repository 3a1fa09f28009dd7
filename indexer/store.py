"""The LMDB store beside the FAISS index: per-id exact μ and log_var in ONE row, and the metadata
needed to show a hit.

One LMDB environment, named sub-databases per modality (store format 2; from format 5 a
modality with an IVF index keeps its rows only in list blocks, indexer/lists.py, and the
builder writes `.vec` to a temporary rows store that the blocks are made from):
  `<modality>.vec`   D float32 μ, then D float16 log_var (1.5 KiB at 256-d: inline in a 4 KiB
                     page, two rows per page; 512-d spills to one overflow page per row)
  `<modality>.meta`  int64 little-endian group, then the item as utf-8
Keys are 8-byte big-endian ids, so byte order is id order: the builder writes them with
append=True (no B-tree search per put) and a cursor walks them in id order.

Why μ sits beside log_var even when FAISS could give it back: a shortlist then costs one
B-tree lookup per id in one `getmulti` call, instead of a FAISS reconstruct plus an LMDB get,
and the FAISS codes are free to be lossy (SQ8 at 10M) without a second copy of μ.
Format 1 (separate `.log_var`/`.mu` sub-databases, μ reconstructed from FAISS) is refused by
indexer/manifest.py with a message to rebuild.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb
import numpy as np

from core.errors import PcmeError

logger = logging.getLogger(__name__)

# 3: format 2 + rows grouped by IVF list (indexer/lists.py); 4: + row scalars; 5: IVF rows only
# in the list blocks, found by id through `.where` (the store half the size); 6: + 16-bit μ
# codes in the blocks for the row bounds
STORE_FORMAT = 6
READABLE_FORMATS = (2, 3, 4, 5, 6)
LOG_VAR_CLIP = 20.0  # |log σ²| beyond 20 (σ² < 2e-9 or > 5e8) carries no ranking information
_PAGE = 4096


def encode_ids(ids: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(ids, dtype=">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _rows(a: np.ndarray) -> list[bytes]:
    raw, step = a.tobytes(), a.shape[1] * a.itemsize
    return [raw[i:i + step] for i in range(0, len(raw), step)]


def row_bytes(dim: int) -> int:
    return 6 * dim  # float32 μ + float16 log_var


def estimate_map_size(rows: int, dim: int, item_bytes: int) -> int:
    """Bytes LMDB needs for `rows` entries, with 2x margin. Values too big for half a page
    spill to whole overflow pages, so a 512-d row (3 KiB) costs a full page."""
    def cost(value_bytes):
        node = 16 + 8 + value_bytes  # node header + key + value
        return node if node < _PAGE // 2 else -(-node // _PAGE) * _PAGE
    per_row = cost(row_bytes(dim)) + cost(8 + 64)
    return 2 * (rows * per_row + 2 * item_bytes) + (64 << 20)


class StoreWriter:
    """Writes one modality batch per call, one transaction per column, keys in increasing id
    order.
    `rows_path`: the `.vec` rows go to that separate LMDB instead (indexer/build.py:
    finish_store makes the list blocks from it, then deletes it)."""

    def __init__(self, path: Path, map_size: int, rows_path: Path | None = None):
        self.path = Path(path)
        self.env = _open_writable(self.path, map_size)
        self.rows_env = _open_writable(Path(rows_path), map_size) if rows_path else self.env
        self.clipped = 0

    def put(self, modality: str, ids: np.ndarray, mu: np.ndarray, log_var: np.ndarray,
            groups: np.ndarray, items: list[str]) -> None:
        n = len(ids)
        if mu.shape != log_var.shape or mu.shape[0] != n or groups.shape != (n,) \
                or len(items) != n:
            raise ValueError(f"put: {n} ids but mu {mu.shape}, log_var {log_var.shape}, "
                             f"groups {groups.shape}, {len(items)} items")
        keys = encode_ids(ids)
        clipped = np.clip(log_var, -LOG_VAR_CLIP, LOG_VAR_CLIP)
        self.clipped += int(np.count_nonzero(clipped != log_var))
        vec = np.concatenate([np.ascontiguousarray(mu, np.float32).view(np.uint8),
                              clipped.astype(np.float16).view(np.uint8)], axis=1)
        g = np.ascontiguousarray(groups, dtype="<i8").tobytes()
        meta = [g[8 * i:8 * i + 8] + s.encode("utf-8") for i, s in enumerate(items)]
        columns = [("vec", _rows(vec)), ("meta", meta)]
        self._write_growing(modality, keys, columns)

    def _write_growing(self, modality: str, keys: list[bytes], columns: list) -> None:
        """Each column in its own transaction (`.vec` may go to the rows store); a full map
        (an estimate too small, e.g. for long items) grows and the column is written again."""
        for name, values in columns:
            env = self.rows_env if name == "vec" else self.env
            while True:
                try:
                    with env.begin(write=True) as txn:
                        db = env.open_db(f"{modality}.{name}".encode(), txn=txn)
                        added = txn.cursor(db).putmulti(zip(keys, values), append=True)[1]
                    break
                except lmdb.MapFullError:
                    env.set_mapsize(2 * env.info()["map_size"])
                    logger.info("grew %s map_size to %d bytes", env.path(), env.info()["map_size"])
            if added != len(keys):
                raise ValueError(f"{self.path}: {modality}.{name}: ids not increasing")

    def copy_from(self, src: Path, modality: str, id_offset: int, names: tuple[str, ...],
                  batch: int = 65_536) -> int:
        """Append every row of another store's `modality` sub-databases (a distributed part
        whose ids start at 0), with `id_offset` added to each id; streams `batch` rows per
        transaction. Returns the rows copied."""
        env = lmdb.open(str(src), readonly=True, lock=False, max_dbs=8, subdir=True)
        try:
            counts = [self._copy_db(env, f"{modality}.{name}", id_offset, batch) for name in names]
        finally:
            env.close()
        if len(set(counts)) > 1:
            raise ValueError(f"{src}: {modality} sub-databases hold different row counts {counts}")
        return counts[0] if counts else 0

    def _copy_db(self, env, name: str, id_offset: int, batch: int) -> int:
        src_db, n = env.open_db(name.encode(), create=False), 0
        with env.begin() as txn:
            cursor = txn.cursor(src_db)
            more = cursor.first()
            while more:
                chunk = []
                while more and len(chunk) < batch:
                    chunk.append((int.from_bytes(cursor.key(), "big") + id_offset, cursor.value()))
                    more = cursor.next()
                keys = encode_ids(np.array([k for k, _ in chunk], np.int64))
                modality, column = name.split(".", 1)
                self._write_growing(modality, keys, [(column, [v for _, v in chunk])])
                n += len(chunk)
        return n

    def close(self) -> None:
        if self.clipped:
            logger.warning("clipped %d log_var values to ±%g before storing as float16",
                           self.clipped, LOG_VAR_CLIP)
        self.env.sync(True)
        self.env.close()
        if self.rows_env is not self.env:   # a temporary rows store: read next, then deleted,
            self.rows_env.close()           # so it is not forced to the disk (~1 s at 1M)


def _open_writable(path: Path, map_size: int):
    return lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True, sync=False,
                     metasync=False)  # durability comes from StoreWriter.close()'s sync


class StoreReader:
    """Read-only access; lock=False because index directories are immutable once written,
    so many processes may read one without a lock file. `readahead`: whether a page fault on
    the memory-mapped file may read the pages after it too. Off for id-by-id shortlists
    (random rows); on where the store has list blocks, whose ~1 MB values are read whole:
    from a cold page cache a block then costs a few large reads instead of one 4 KiB read
    per page."""

    def __init__(self, path: Path, dim: int, readahead: bool = False):
        self.path, self.dim = Path(path), dim
        if not (self.path / "data.mdb").is_file():
            raise PcmeError(f"{self.path}: LMDB store is missing")
        try:
            self.env = lmdb.open(str(self.path), readonly=True, lock=False, max_dbs=8,
                                 subdir=True, readahead=readahead)
        except lmdb.Error as e:
            raise PcmeError(f"{self.path}: cannot open LMDB store ({e})") from None
        self._dbs: dict[str, object] = {}

    def _db(self, modality: str, name: str):
        key = f"{modality}.{name}"
        if key not in self._dbs:
            try:
                self._dbs[key] = self.env.open_db(key.encode(), create=False)
            except lmdb.Error:
                raise PcmeError(f"{self.path}: store has no sub-database '{key}'") from None
        return self._dbs[key]

    def get(self, modality: str, name: str, ids: np.ndarray) -> list[bytes]:
        """Raw values of one sub-database for `ids`: one transaction, one `getmulti` call."""
        keys = encode_ids(ids)
        db = self._db(modality, name)
        with self.env.begin() as txn:
            pairs = txn.cursor(db).getmulti(keys)
        if len(pairs) != len(keys):  # getmulti skips missing keys
            found = {k for k, _ in pairs}
            missing = next(int(i) for i, k in zip(ids, keys) if k not in found)
            raise PcmeError(f"{self.path}: {modality}.{name} has no entry for id {missing}")
        return [v for _, v in pairs]

    def vectors(self, modality: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(μ float32 [M, D], log_var float32 [M, D]) for `ids`."""
        return self.decode(self.get(modality, "vec", ids))

    def decode(self, rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        raw = np.frombuffer(bytearray().join(rows), np.uint8).reshape(len(rows), row_bytes(self.dim))
        mu = raw[:, :4 * self.dim].view(np.float32)
        return mu, raw[:, 4 * self.dim:].view(np.float16).astype(np.float32)

    def meta(self, modality: str, ids: np.ndarray) -> list[tuple[int, str]]:
        rows = self.get(modality, "meta", ids)
        return [(int.from_bytes(v[:8], "little", signed=True), v[8:].decode("utf-8")) for v in rows]

    def scan(self, modality: str, count: int, start: int = 0,
             stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(μ, log_var) of ids start..stop-1 in id order (one transaction, one cursor walk);
        `count` is what the manifest says the modality holds, checked on a full scan."""
        stop = count if stop is None else min(stop, count)
        db = self._db(modality, "vec")  # before begin(): a txn cannot see dbs opened after it
        with self.env.begin() as txn:
            cursor = txn.cursor(db)
            rows = []
            if cursor.set_range(encode_ids(np.array([start]))[0]):
                for key, value in cursor:
                    if int.from_bytes(key, "big") >= stop:
                        break
                    rows.append(value)
        full = start == 0 and stop == count
        if len(rows) != stop - start or (full and txn_count(self.env, db) != count):
            raise PcmeError(f"{self.path}: {modality}.vec has {len(rows)} rows in "
                            f"[{start}, {stop}), manifest says {count} in all")
        return self.decode(rows) if rows else (np.zeros((0, self.dim), np.float32),) * 2

    def close(self) -> None:
        self.env.close()


def txn_count(env, db) -> int:
    with env.begin() as txn:
        return txn.stat(db)["entries"]


def stored_log_var(log_var: np.ndarray) -> np.ndarray:
    """log_var exactly as the store gives it back (clipped, rounded to float16), as float32."""
    return np.clip(log_var, -LOG_VAR_CLIP, LOG_VAR_CLIP).astype(np.float16).astype(np.float32)
