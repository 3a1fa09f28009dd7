"""The LMDB store beside the FAISS index: per-id log_var (float16), exact μ when the FAISS
codes are lossy (float32), and the metadata needed to show a hit.

One LMDB environment, named sub-databases per modality:
  `<modality>.log_var`  D float16 values   (float16 keeps a 512-d row inline in a 4 KiB page)
  `<modality>.mu`       D float32 values   (only when the FAISS index cannot give μ back exactly)
  `<modality>.meta`     int64 little-endian group, then the item as utf-8
Keys are 8-byte big-endian ids, so byte order is id order: the builder writes them with
append=True (no B-tree search per put) and a cursor walks them in id order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lmdb
import numpy as np

from core.errors import PcmeError

logger = logging.getLogger(__name__)

LOG_VAR_CLIP = 20.0  # |log σ²| beyond 20 (σ² < 2e-9 or > 5e8) carries no ranking information
_PAGE = 4096


def encode_ids(ids: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(ids, dtype=">u8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


def _rows(a: np.ndarray) -> list[bytes]:
    raw, step = a.tobytes(), a.shape[1] * a.itemsize
    return [raw[i:i + step] for i in range(0, len(raw), step)]


def estimate_map_size(rows: int, dim: int, item_bytes: int, with_mu: bool) -> int:
    """Bytes LMDB needs for `rows` entries, with 2x margin. Values too big for half a page
    spill to whole overflow pages, so μ as float32 at 512-d costs a full page per row."""
    def cost(value_bytes):
        node = 16 + 8 + value_bytes  # node header + key + value
        return node if node < _PAGE // 2 else -(-node // _PAGE) * _PAGE
    per_row = cost(2 * dim) + cost(8 + 64) + (cost(4 * dim) if with_mu else 0)
    return 2 * (rows * per_row + 2 * item_bytes) + (64 << 20)


class StoreWriter:
    """Writes one modality batch per call, in one transaction, keys in increasing id order."""

    def __init__(self, path: Path, map_size: int):
        self.path = Path(path)
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=8, subdir=True,
                             sync=False, metasync=False)  # durability comes from close()'s sync
        self.clipped = 0

    def put(self, modality: str, ids: np.ndarray, log_var: np.ndarray, groups: np.ndarray,
            items: list[str], mu: np.ndarray | None = None) -> None:
        n = len(ids)
        if log_var.shape[0] != n or groups.shape != (n,) or len(items) != n:
            raise ValueError(f"put: {n} ids but log_var {log_var.shape}, groups {groups.shape}, "
                             f"{len(items)} items")
        keys = encode_ids(ids)
        clipped = np.clip(log_var, -LOG_VAR_CLIP, LOG_VAR_CLIP)
        self.clipped += int(np.count_nonzero(clipped != log_var))
        g = np.ascontiguousarray(groups, dtype="<i8").tobytes()
        meta = [g[8 * i:8 * i + 8] + s.encode("utf-8") for i, s in enumerate(items)]
        columns = [("log_var", _rows(clipped.astype(np.float16))), ("meta", meta)]
        if mu is not None:
            columns.append(("mu", _rows(np.ascontiguousarray(mu, dtype=np.float32))))
        self._write_growing(modality, keys, columns)

    def _write_growing(self, modality: str, keys: list[bytes], columns: list) -> None:
        while True:
            try:
                return self._write(modality, keys, columns)
            except lmdb.MapFullError:  # estimate too small (long items): grow and redo the batch
                self.env.set_mapsize(2 * self.env.info()["map_size"])
                logger.info("grew %s map_size to %d bytes", self.path, self.env.info()["map_size"])

    def _write(self, modality: str, keys: list[bytes], columns: list) -> None:
        with self.env.begin(write=True) as txn:
            for name, values in columns:
                db = self.env.open_db(f"{modality}.{name}".encode(), txn=txn)
                added = txn.cursor(db).putmulti(zip(keys, values), append=True)[1]
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


class StoreReader:
    """Read-only access; lock=False because index directories are immutable once written,
    so many processes may read one without a lock file."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim = Path(path), dim
        if not (self.path / "data.mdb").is_file():
            raise PcmeError(f"{self.path}: LMDB store is missing")
        try:
            self.env = lmdb.open(str(self.path), readonly=True, lock=False, max_dbs=8,
                                 subdir=True, readahead=False)  # random reads: no readahead
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

    def get(self, modality: str, names: tuple[str, ...], ids: np.ndarray) -> list[list[bytes]]:
        """Raw values of each named sub-database for `ids`, all in ONE read transaction."""
        keys = encode_ids(ids)
        dbs = [self._db(modality, name) for name in names]
        with self.env.begin() as txn:
            out = [txn.cursor(db).getmulti(keys) for db in dbs]
        for name, pairs in zip(names, out):
            if len(pairs) != len(keys):  # getmulti skips missing keys
                found = {k for k, _ in pairs}
                missing = next(int(i) for i, k in zip(ids, keys) if k not in found)
                raise PcmeError(f"{self.path}: {modality}.{name} has no entry for id {missing}")
        return [[v for _, v in pairs] for pairs in out]

    def log_var(self, modality: str, ids: np.ndarray) -> np.ndarray:
        (rows,) = self.get(modality, ("log_var",), ids)
        return self.decode(rows, np.float16)

    def decode(self, rows: list[bytes], dtype) -> np.ndarray:
        return np.frombuffer(b"".join(rows), dtype=dtype).reshape(len(rows), self.dim).astype(np.float32)

    def meta(self, modality: str, ids: np.ndarray) -> list[tuple[int, str]]:
        (rows,) = self.get(modality, ("meta",), ids)
        return [(int.from_bytes(v[:8], "little", signed=True), v[8:].decode("utf-8")) for v in rows]

    def scan(self, modality: str, name: str, dtype, count: int) -> np.ndarray:
        """Every row of one sub-database in id order (one transaction, one cursor walk)."""
        db = self._db(modality, name)  # before begin(): a txn cannot see dbs opened after it
        with self.env.begin() as txn:
            cursor = txn.cursor(db)
            rows = list(cursor.iternext(keys=False, values=True))
        if len(rows) != count:
            raise PcmeError(f"{self.path}: {modality}.{name} has {len(rows)} rows, "
                            f"manifest says {count}")
        return self.decode(rows, dtype)

    def close(self) -> None:
        self.env.close()


def stored_log_var(log_var: np.ndarray) -> np.ndarray:
    """log_var exactly as the store gives it back (clipped, rounded to float16), as float32."""
    return np.clip(log_var, -LOG_VAR_CLIP, LOG_VAR_CLIP).astype(np.float16).astype(np.float32)
