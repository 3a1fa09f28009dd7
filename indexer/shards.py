"""μ/log_var parquet shards: the hand-off between the encoders and the indexer.

A shard directory holds `shard-00000.parquet`, … and a `manifest.json` (DESIGN.md "Formats").
Ids form one space per modality, contiguous 0..n-1 in write order, so a reader can check them
in O(1) memory: every row of a modality must carry exactly the next id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import PcmeError
from core.atomic import AtomicDir, atomic_write, sha256_file, utc_now, write_json
from indexer.manifest import MODALITIES, SCHEMA_VERSION, read_manifest

logger = logging.getLogger(__name__)

READ_BATCH = 65_536  # rows per streamed batch: bounds memory at ~READ_BATCH·D·8 bytes
READ_BUFFER = 1 << 20  # bytes: pages are streamed through this buffer, not a whole column chunk
ROW_GROUP = 16_384  # rows per parquet row group written: a reader decodes one group at a time,
                    # ~3x its vectors' bytes (repetition levels, then the fixed-size lists)


def shard_schema(dim: int) -> pa.Schema:
    vec = pa.list_(pa.float32(), dim)
    return pa.schema([("id", pa.int64()), ("modality", pa.string()), ("mu", vec),
                      ("log_var", vec), ("item", pa.string()), ("group", pa.int64())])


@dataclass
class ShardBatch:
    """Consecutive rows of one shard file, as numpy arrays (modalities may be mixed)."""
    file: str
    modality: np.ndarray  # [r] object array of "image"/"text"
    ids: np.ndarray       # [r] int64
    mu: np.ndarray        # [r, D] float32
    log_var: np.ndarray   # [r, D] float32
    items: list[str]
    groups: np.ndarray    # [r] int64

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, modality: str) -> "ShardBatch":
        keep = self.modality == modality
        if keep.all():  # the usual case (writers add one modality at a time): no copy
            return self
        rows = np.flatnonzero(keep)
        return ShardBatch(self.file, self.modality[keep], self.ids[keep], self.mu[keep],
                          self.log_var[keep], [self.items[i] for i in rows], self.groups[keep])


@dataclass
class ShardData:
    """All rows of one modality, ordered by id."""
    ids: np.ndarray
    mu: np.ndarray
    log_var: np.ndarray
    items: list[str]
    groups: np.ndarray


class ShardWriter:
    """Streams rows into parquet shards of `rows_per_shard` rows; memory stays bounded by one
    shard plus the batch being added. Everything goes to a temp sibling dir that replaces
    `out_dir` only at `close()`; used as a context manager, an exception discards it."""

    def __init__(self, out_dir: Path, dim: int, producer: dict, rows_per_shard: int = 100_000):
        if not isinstance(dim, int) or dim < 1:
            raise PcmeError(f"ShardWriter: dim must be a positive int, got {dim!r}")
        if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise PcmeError(f"ShardWriter: rows_per_shard must be >= 1, got {rows_per_shard!r}")
        self.dim, self.producer, self.rows_per_shard = dim, dict(producer), rows_per_shard
        self.counts = {m: 0 for m in MODALITIES}
        self._atomic = AtomicDir(out_dir, kind="shards")
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[dict] = []

    def add(self, modality: str, mu: np.ndarray, log_var: np.ndarray, items: list[str],
            groups: np.ndarray) -> np.ndarray:
        """Append rows of one modality; returns the global ids they were given."""
        if self._atomic.done:
            raise PcmeError("ShardWriter.add: writer is already closed")
        mu, log_var, groups, item_arr = check_rows("ShardWriter.add", self.dim, modality, mu,
                                                    log_var, items, groups)
        n = len(mu)
        ids = np.arange(self.counts[modality], self.counts[modality] + n, dtype=np.int64)
        self.counts[modality] += n
        self._pending.append(rows_table(self.dim, modality, ids, mu, log_var, item_arr, groups))
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)
        return ids

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        name = f"shard-{len(self._shards):05d}.parquet"
        path = self._atomic.tmp / name
        pq.write_table(table.slice(0, rows), path, row_group_size=ROW_GROUP)
        self._shards.append({"file": name, "rows": rows, "sha256": sha256_file(path)})
        rest = table.slice(rows)
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        logger.info("wrote %s (%d rows)", name, rows)

    def close(self) -> Path:
        """Write the last shard and the manifest, then swap the directory in."""
        if self._atomic.done:
            raise PcmeError("ShardWriter.close: writer is already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        write_json(self._atomic.tmp / "manifest.json", {
            "schema_version": SCHEMA_VERSION, "kind": "shards", "dim": self.dim,
            "counts": dict(self.counts), "shards": self._shards, "producer": self.producer,
            "created": utc_now()})
        return self._atomic.commit()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._atomic.abort()
        elif not self._atomic.done:
            self.close()


def check_rows(caller: str, dim: int, modality: str, mu, log_var, items: list[str], groups):
    """Rows of one modality checked and converted: (μ, log_var float32, groups int64, items)."""
    where = f"{caller}({modality!r})"
    if modality not in MODALITIES:
        raise PcmeError(f"{where}: unknown modality, expected one of {MODALITIES}")
    mu, log_var = np.asarray(mu), np.asarray(log_var)
    for name, a in (("mu", mu), ("log_var", log_var)):
        if not np.issubdtype(a.dtype, np.floating):
            raise PcmeError(f"{where}: {name} has dtype {a.dtype}, expected a float dtype")
        if a.ndim != 2 or a.shape[1] != dim or a.shape[0] != len(mu):
            raise PcmeError(f"{where}: {name} has shape {a.shape}, expected "
                            f"({len(mu)}, {dim})")
    mu, log_var = mu.astype(np.float32), log_var.astype(np.float32)  # f64 overflow -> inf, caught
    for name, a in (("mu", mu), ("log_var", log_var)):
        if not np.isfinite(a).all():
            raise PcmeError(f"{where}: {name} has NaN or inf values")
    groups = np.asarray(groups)
    if not np.issubdtype(groups.dtype, np.integer) or groups.shape != (len(mu),):
        raise PcmeError(f"{where}: groups has dtype {groups.dtype} and shape {groups.shape}, "
                        f"expected integers of shape ({len(mu)},)")
    if len(items) != len(mu):
        raise PcmeError(f"{where}: {len(items)} items for {len(mu)} rows")
    try:
        item_arr = pa.array(items, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise PcmeError(f"{where}: items must be a list of str") from None
    if item_arr.null_count:
        raise PcmeError(f"{where}: items must not contain None")
    return mu, log_var, groups.astype(np.int64), item_arr


def rows_table(dim: int, modality: str, ids: np.ndarray, mu: np.ndarray, log_var: np.ndarray,
               item_arr: pa.Array, groups: np.ndarray) -> pa.Table:
    n = len(ids)
    columns = [pa.array(ids), pa.array(np.full(n, modality, dtype=object), pa.string()),
               _vectors(mu), _vectors(log_var), item_arr, pa.array(groups)]
    return pa.Table.from_arrays(columns, schema=shard_schema(dim))


def write_shard_file(path: Path, modality: str, first_id: int, mu, log_var, items: list[str],
                     groups) -> dict:
    """One shard file of one modality whose ids run from `first_id`, written under a temp
    name and renamed into place (a rewrite replaces it whole). Returns its manifest entry."""
    dim = np.asarray(mu).shape[-1]
    mu, log_var, groups, item_arr = check_rows(str(path), dim, modality, mu, log_var, items, groups)
    ids = np.arange(first_id, first_id + len(mu), dtype=np.int64)
    table = rows_table(dim, modality, ids, mu, log_var, item_arr, groups)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROW_GROUP))
    return {"file": Path(path).name, "rows": len(mu), "sha256": sha256_file(path)}


def read_files(shard_dir: Path, names: list[str], dim: int,
               batch_size: int = READ_BATCH) -> Iterator[ShardBatch]:
    """Stream some of a directory's shard files, in the order given."""
    for name in names:
        yield from _read_file(Path(shard_dir) / name, dim, batch_size)


def _vectors(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def read_shard_manifest(shard_dir: Path) -> dict:
    """The shard manifest with its fields type-checked (PcmeError naming the file otherwise)."""
    manifest = read_manifest(shard_dir, "shards")
    path = Path(shard_dir) / "manifest.json"
    dim, counts, shards = manifest.get("dim"), manifest.get("counts"), manifest.get("shards")
    if not isinstance(dim, int) or dim < 1:
        raise PcmeError(f"{path}: dim must be a positive int, got {dim!r}")
    if not isinstance(counts, dict) or any(
            m not in MODALITIES or not isinstance(n, int) or n < 0 for m, n in counts.items()):
        raise PcmeError(f"{path}: counts must map image/text to non-negative ints, got {counts!r}")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
        and isinstance(s.get("rows"), int) and isinstance(s.get("sha256"), str) for s in shards)
    if not ok:
        raise PcmeError(f"{path}: shards must be a list of {{file, rows, sha256}} with plain names")
    return manifest


def read_shards(shard_dir: Path, batch_size: int = READ_BATCH) -> Iterator[ShardBatch]:
    """Stream every shard listed in the manifest, in order, `batch_size` rows at a time.
    Checks the schema of each file; does not hash files or check values (see validate_shards)."""
    manifest = read_shard_manifest(shard_dir)
    for entry in manifest["shards"]:
        yield from _read_file(Path(shard_dir) / entry["file"], manifest["dim"], batch_size)


def _read_file(path: Path, dim: int, batch_size: int) -> Iterator[ShardBatch]:
    if not path.is_file():
        raise PcmeError(f"{path}: shard file listed in the manifest is missing")
    try:
        pf = pq.ParquetFile(path, buffer_size=READ_BUFFER)  # without it a row group is read whole
        _check_schema(path, pf.schema_arrow, dim)
        columns = list(shard_schema(dim).names)
        for group in range(pf.num_row_groups):  # one at a time: a file-wide iterator reads ahead
            for rb in pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=[group]):
                yield _to_batch(path, rb, dim)
    except (pa.ArrowException, OSError) as e:
        raise PcmeError(f"{path}: unreadable parquet ({e})") from None


def _check_schema(path: Path, schema: pa.Schema, dim: int) -> None:
    for want in shard_schema(dim):
        if want.name not in schema.names:
            raise PcmeError(f"{path}: missing column '{want.name}'")
        got = schema.field(want.name).type
        if want.type == pa.string() and pa.types.is_large_string(got):
            continue
        if pa.types.is_fixed_size_list(got) and got.value_type == pa.float32() and got != want.type:
            raise PcmeError(f"{path}: column '{want.name}' has dimension {got.list_size}, "
                            f"manifest dim is {dim}")
        if got != want.type:
            raise PcmeError(f"{path}: column '{want.name}' has type {got}, expected {want.type}")


def _to_batch(path: Path, rb: pa.RecordBatch, dim: int) -> ShardBatch:
    def col(name):
        arr = rb.column(name)
        if arr.null_count or (pa.types.is_fixed_size_list(arr.type) and arr.flatten().null_count):
            raise PcmeError(f"{path}: column '{name}' has null values")
        return arr

    def vectors(name):  # flatten() honours slice offsets, unlike .values
        return col(name).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)

    return ShardBatch(path.name, col("modality").to_numpy(zero_copy_only=False),
                      col("id").to_numpy(), vectors("mu"), vectors("log_var"),
                      col("item").to_pylist(), col("group").to_numpy())


def validate_shards(shard_dir: Path, on_batch: Callable[[ShardBatch], None] | None = None) -> dict:
    """Check a shard directory end to end, streaming; returns its manifest or raises PcmeError
    naming the file and the problem. `on_batch` sees every checked batch, so a caller can do
    its own work in the same pass (the builder gathers its training sample) instead of
    reading the shards again."""
    shard_dir = Path(shard_dir)
    manifest = read_shard_manifest(shard_dir)
    dim, next_id = manifest["dim"], {m: 0 for m in MODALITIES}
    for entry in manifest["shards"]:
        path = shard_dir / entry["file"]
        if not path.is_file():
            raise PcmeError(f"{path}: shard file listed in the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise PcmeError(f"{path}: sha256 does not match the manifest (file changed or truncated)")
        rows = 0
        for batch in _read_file(path, dim, READ_BATCH):
            _check_values(path, batch, next_id)
            if on_batch is not None:
                on_batch(batch)
            rows += len(batch)
        if rows != entry["rows"]:
            raise PcmeError(f"{path}: has {rows} rows, manifest says {entry['rows']}")
    counts = {m: manifest["counts"].get(m, 0) for m in MODALITIES}
    if next_id != counts:
        raise PcmeError(f"{shard_dir / 'manifest.json'}: counts {manifest['counts']} do not "
                        f"match the rows found {next_id}")
    logger.info("validated %s: dim %d, counts %s", shard_dir, dim, counts)
    return manifest


def _check_values(path: Path, batch: ShardBatch, next_id: dict[str, int]) -> None:
    """Modality names, finite values, and ids continuing each modality's 0..n-1 run."""
    unknown = set(np.unique(batch.modality)) - set(MODALITIES)
    if unknown:
        raise PcmeError(f"{path}: unknown modality value(s) {sorted(unknown)}")
    for name, a in (("mu", batch.mu), ("log_var", batch.log_var)):
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise PcmeError(f"{path}: {name} has NaN or inf values ({batch.modality[row]} "
                            f"id {batch.ids[row]})")
    for m in MODALITIES:
        ids = batch.ids[batch.modality == m]
        want = np.arange(next_id[m], next_id[m] + len(ids))
        if not np.array_equal(ids, want):
            i = int(np.argmax(ids != want))
            what = "duplicate id" if ids[i] < want[i] and ids[i] >= 0 else "ids not contiguous at id"
            raise PcmeError(f"{path}: {what} {ids[i]} for {m} (expected {want[i]}; ids must "
                            f"run 0..n-1 per modality in write order)")
        next_id[m] += len(ids)


def load_shards(shard_dir: Path, modality: str) -> ShardData:
    """All rows of one modality in memory, ordered by id (for tests, eval, small data)."""
    if modality not in MODALITIES:
        raise PcmeError(f"modality {modality!r}: expected one of {MODALITIES}")
    manifest = read_shard_manifest(shard_dir)
    n, dim = manifest["counts"].get(modality, 0), manifest["dim"]
    out = ShardData(np.arange(n, dtype=np.int64), np.empty((n, dim), np.float32),
                    np.empty((n, dim), np.float32), [""] * n, np.empty(n, np.int64))
    seen = 0
    for batch in read_shards(shard_dir):
        b = batch.select(modality)
        if len(b) and (b.ids.min() < 0 or b.ids.max() >= n):
            raise PcmeError(f"{Path(shard_dir) / b.file}: {modality} id out of range 0..{n - 1}")
        out.mu[b.ids], out.log_var[b.ids], out.groups[b.ids] = b.mu, b.log_var, b.groups
        for i, item in zip(b.ids.tolist(), b.items):
            out.items[i] = item
        seen += len(b)
    if seen != n:
        raise PcmeError(f"{Path(shard_dir) / 'manifest.json'}: counts say {n} {modality} rows, "
                        f"found {seen}")
    return out
