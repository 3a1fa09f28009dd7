"""Reading the manifests of shard and index directories (written with core/atomic.py).

Every directory a stage writes is self-describing: a `manifest.json` with a kind and a schema
version, checked here before anything else in the directory is trusted.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from core.atomic import MANIFEST, utc_now
from core.commands import cli_command
from core.errors import PcmeError
from indexer.store import READABLE_FORMATS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MODALITIES = ("image", "text")  # here, not in shards.py: the query path needs no pyarrow


def build_stamp() -> dict:
    """`created` and a `build_id` unique to this build, for an index manifest: a service tells a
    rebuilt index from the one it serves by the id (`created` has one-second resolution, and
    two builds of the same shards within a second could not be told apart by it)."""
    return {"created": utc_now(), "build_id": uuid.uuid4().hex}


def read_manifest(directory: Path, kind: str) -> dict:
    """Load `directory/manifest.json` and check its schema version and kind."""
    directory = Path(directory)
    if directory.is_file():
        raise PcmeError(f"{directory}: is a file; give the {kind} directory that holds it"
                        f" ({directory.parent}/)")
    if not directory.is_dir():
        raise PcmeError(f"{directory}: {kind} directory does not exist; {_FIRST_STEP[kind]()}")
    path = directory / MANIFEST
    if not path.is_file():
        raise PcmeError(f"{path}: no manifest (empty or incomplete {kind} directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PcmeError(f"{path}: manifest unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        raise PcmeError(f"{path}: not a {kind} manifest (kind={_get(manifest, 'kind')!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PcmeError(f"{path}: schema_version {_get(manifest, 'schema_version')!r} "
                        f"is not supported (expected {SCHEMA_VERSION})")
    return manifest


# the step that writes each kind of directory, for "does not exist" errors
_FIRST_STEP = {
    "shards": lambda: f"write it first with train (or encode), run: {cli_command('train')}",
    "index": lambda: f"build it first, run: {cli_command('index', '--shards', 'out/')}",
}


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else None




def read_index_manifest(index_dir: Path) -> dict:
    """The manifest of an index directory, checked once for everything the reader and `info`
    rely on: a positive dim, item counts, and per non-empty modality its store and nprobe."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir, "index")
    where = index_dir / MANIFEST
    dim, counts = manifest.get("dim"), manifest.get("counts")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise PcmeError(f"{where}: malformed index manifest (dim {dim!r})")
    if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()):
        raise PcmeError(f"{where}: malformed index manifest (counts {counts!r})")
    for key in ("factory", "nprobe", "nprobe_recall", "augmented", "variance_stats"):
        if not isinstance(manifest.get(key, {}), dict):
            raise PcmeError(f"{where}: malformed index manifest ({key} {manifest.get(key)!r})")
    try:
        manifest["store"]["file"]
        for m, n in counts.items():
            if n:
                manifest["nprobe"][m]
    except (KeyError, TypeError) as e:
        raise PcmeError(f"{where}: malformed index manifest (missing or bad field {e})") from None
    found = manifest["store"].get("format", 1)
    if found not in READABLE_FORMATS:  # format 1: σ only, μ from FAISS; see indexer/store.py
        raise PcmeError(f"{where}: store format {found!r}, this version reads formats "
                        f"{', '.join(map(str, READABLE_FORMATS))}; rebuild the index (pcme index --shards DIR --out "
                        f"{index_dir})")
    return manifest
