"""What an index directory holds: `python cli.py info index/`.

Reads only the manifest and file sizes (no FAISS or LMDB load), plus one sha256 of the checkpoint,
so it answers "is this index still in step with its model?" in about the time it takes to hash
the checkpoint.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from core.atomic import sha256_file
from indexer.manifest import read_index_manifest


logger = logging.getLogger(__name__)


def index_info(index_dir: str | Path) -> dict:
    """Counts, dim, factory and nprobe per modality, the checkpoint (path, recorded sha256, whether
    it still exists and matches) and the size of every file, from the manifest of `index_dir`."""
    index_dir = Path(index_dir)
    manifest = read_index_manifest(index_dir)  # the reader's own checks
    dim, counts = manifest["dim"], manifest["counts"]
    files = _file_sizes(index_dir)
    logger.debug("%s: %d files", index_dir, len(files))
    return {
        "index_dir": str(index_dir),
        "dim": dim,
        "counts": dict(counts),
        "factory": dict(manifest.get("factory", {})),
        "nprobe": dict(manifest.get("nprobe", {})),
        "nprobe_recall": dict(manifest.get("nprobe_recall", {})),
        "created": manifest.get("created"),
        "shards": manifest.get("shards", {}).get("dir") if isinstance(manifest.get("shards"), dict) else None,
        "store": _store(manifest.get("store", {})),
        "checkpoint": _checkpoint(manifest.get("producer", {})),
        "files": files,
        "total_bytes": sum(files.values()),
    }


def _store(store: dict) -> str:
    """The store's format in words: what a search can use, and whether a rebuild would add."""
    found = store.get("format")
    lists = ", ".join(store.get("lists", ()))
    if found is not None and found >= 3 and not lists:
        return f"format {found} (rows by id: no IVF index, so no list blocks)"
    if found is not None and found >= 5:
        return f"format {found} (rows only in list blocks, with per-row bounds: {lists})"
    if found == 4:
        return f"format 4 (list blocks with per-row bounds: {lists}; rows twice: rebuild for " \
               f"the format-5 store, half the size)"
    if found == 3:
        return (f"format 3 (list blocks: {lists}; rebuild for the per-row elk/bhattacharyya "
                f"bounds of format 4)")
    return f"format {found} (rows by id only; rebuild for list blocks)"


def _checkpoint(producer) -> dict:
    """The checkpoint the index was built with, and whether the file still is that checkpoint:
    queries refuse to run with a changed one, so `info` is where a user finds out why."""
    producer = producer if isinstance(producer, dict) else {}
    path, recorded = producer.get("checkpoint"), producer.get("checkpoint_sha256")
    out = {"path": path, "sha256": recorded, "exists": False, "matches": None}
    if not isinstance(path, str) or not path:
        return out
    if Path(path).is_file():
        logger.debug("hashing checkpoint %s", path)
        out["exists"] = True
        out["matches"] = (sha256_file(Path(path)) == recorded) if recorded else None
    return out


def _file_sizes(index_dir: Path) -> dict[str, int]:
    """Bytes per file under `index_dir` (relative path -> size), sorted by path."""
    sizes = {}
    for root, _, names in os.walk(index_dir):
        for name in names:
            path = Path(root) / name
            sizes[str(path.relative_to(index_dir))] = path.stat().st_size
    return dict(sorted(sizes.items()))


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def format_info(info: dict) -> list[str]:
    """The lines `cli.py info` prints."""
    lines = [f"index: {info['index_dir']}   dim {info['dim']}   created {info['created']}"]
    for m, n in info["counts"].items():
        nprobe = info["nprobe"].get(m)
        recall = info["nprobe_recall"].get(m)
        probe = f"   nprobe {nprobe}" if nprobe else ""
        probe += f" (recall@10 {recall:.3f})" if isinstance(recall, (int, float)) else ""
        lines.append(f"  {m:<6} {n:>10d} vectors   {info['factory'].get(m, '?')}{probe}")
    lines.append(f"store: {info['store']}")
    ck = info["checkpoint"]
    state = ("missing" if not ck["exists"] else "matches" if ck["matches"]
             else "CHANGED since indexing" if ck["matches"] is False else "no sha256 recorded")
    lines.append(f"model: {ck['path']}   sha256 {ck['sha256']}   [{state}]")
    if info["shards"]:
        lines.append(f"shards: {info['shards']}")
    for name, size in info["files"].items():
        lines.append(f"  {human_bytes(size):>10}  {name}")
    lines.append(f"  {human_bytes(info['total_bytes']):>10}  total")
    return lines
