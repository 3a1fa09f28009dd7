"""`encode --ray`: a split encoded into shards by a pool of Ray actors, one part at a time.

The driver cuts each modality's rows (in split order, so ids are `count_before + row` as in
the single-process encode) into contiguous parts. Each actor loads the model and the split
once, encodes whole parts and writes each as a shard file into a staging folder beside the
output, under a temporary name renamed into place: a retried part overwrites, never
duplicates. When every part is there, the commit step checks each file holds exactly its id
range, records its sha256 and swaps the staging files into the ordinary shard directory with
its manifest (atomically). A re-run after an interruption finds the finished parts in the
staging folder and skips them.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.atomic import AtomicDir, sha256_file, utc_now, write_json
from core.cluster import fault_point, import_ray, run_on_actors, worker_count
from core.errors import PcmeError
from indexer.manifest import SCHEMA_VERSION
from indexer.shards import MODALITIES, write_shard_file

from encoders.model.checkpoint import load_model, resolve_device
from encoders.model.encode import encode_images, encode_texts
from encoders.training.data import load_split

logger = logging.getLogger(__name__)

# Rows per part: a multiple of the encode batch sizes (512 texts, 256 images), so every batch
# an actor encodes is exactly a batch of the single-process encode and the vectors agree bit
# for bit; big enough that loading the model once per actor is noise.
PART_ROWS = 16_384
TEXT_BATCH, IMAGE_BATCH = 512, 256


@dataclass(frozen=True)
class Part:
    modality: str
    start: int   # first id
    stop: int    # one past the last id

    @property
    def file(self) -> str:
        return f"{self.modality}-{self.start:012d}.parquet"


def plan_parts(counts: dict[str, int], rows: int = PART_ROWS) -> list[Part]:
    """Contiguous id ranges of at most `rows`, images first, then captions (shard order)."""
    if rows < 1 or rows % TEXT_BATCH or rows % IMAGE_BATCH:
        raise PcmeError(f"--part-rows {rows}: must be a positive multiple of {TEXT_BATCH}")
    return [Part(m, s, min(s + rows, counts[m])) for m in MODALITIES
            for s in range(0, counts[m], rows)]


def staging_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.parts"


class PartEncoder:
    """The actor: the model and the split loaded once, then any number of parts."""

    def __init__(self, checkpoint: str, data: str, root: str, split: str, device: str):
        self.device = resolve_device(device)
        self.model, self.vocab, _ = load_model(checkpoint, self.device)
        self.split = load_split(data, Path(root), split)

    def ready(self) -> int:
        return os.getpid()

    def encode(self, part: Part, stage: str) -> dict:
        fault_point(f"encode-{part.file}")
        sp, n = self.split, part.stop - part.start
        if part.modality == "image":
            mu, lv = encode_images(self.model, lambda i: sp.load_image(part.start + i), n,
                                   self.device, batch_size=IMAGE_BATCH)
            items = [str((sp.root / p).resolve()) for p in sp.image_paths[part.start:part.stop]]
            groups = np.arange(part.start, part.stop, dtype=np.int64)
        else:
            mu, lv = encode_texts(self.model, self.vocab, sp.captions[part.start:part.stop],
                                  self.device, batch_size=TEXT_BATCH)
            items, groups = list(sp.captions[part.start:part.stop]), sp.caption_image[part.start:part.stop]
        return write_shard_file(Path(stage) / part.file, part.modality, part.start, mu, lv,
                                items, groups)


def encode_distributed(checkpoint: str, data: str, root: str, split: str, out: str,
                       device: str = "auto", part_rows: int | None = None,
                       workers: int | None = None, pool: list | None = None) -> tuple[Path, dict]:
    """Encode on the connected Ray cluster; returns (shard dir, job facts). `pool`: ready
    PartEncoder actors (from encoder_actors) to use instead of starting `workers` new ones."""
    ray = import_ray()
    from encoders.training.pipeline import producer_of  # torch-free callers never load it

    out_dir, sp = Path(out).absolute(), load_split(data, Path(root), split)
    AtomicDir(out_dir, kind="shards").abort()  # refuse a foreign --out before any work
    model, _, _ = load_model(checkpoint, resolve_device("cpu"))
    producer = {**producer_of(checkpoint, model), "dataset": sp.dataset, "split": sp.name}
    parts = plan_parts({"image": sp.n_images, "text": sp.n_captions}, part_rows or PART_ROWS)
    stage = staging_dir(out_dir)
    stage.mkdir(parents=True, exist_ok=True)
    todo = [p for p in parts if not (stage / p.file).is_file()]
    logger.info("%d parts, %d already encoded in %s", len(parts), len(parts) - len(todo), stage)
    make = encoder_actors(checkpoint, data, root, split, device)
    done = run_on_actors(ray, make, workers or worker_count(ray), todo,
                         lambda actor, p: actor.encode.remote(p, str(stage)), key=lambda p: p.file,
                         pool=pool)
    facts = {"parts": len(parts), "encoded": len(todo), "skipped": len(parts) - len(todo),
             "workers_lost": done[None]}
    return commit_parts(stage, out_dir, parts, model.cfg.out_dim, producer), facts


def encoder_actors(checkpoint: str, data: str, root: str, split: str, device: str):
    """A factory of PartEncoder actors: one CPU each, and a GPU where the cluster has them."""
    ray = import_ray()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and device != "cpu" else 0
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(PartEncoder)
    args = (str(Path(checkpoint).resolve()), data, str(Path(root).resolve()), split, device)
    return lambda: actor_cls.remote(*args)


def commit_parts(stage: Path, out_dir: Path, parts: list[Part], dim: int, producer: dict) -> Path:
    """Check every part file holds exactly its id range, then swap them into `out_dir` with
    the shard manifest; the staging folder (and any temp file a lost worker left) goes."""
    entries = [_check_part(stage / p.file, p) for p in parts]
    with AtomicDir(out_dir, kind="shards") as tmp:
        for p in parts:
            os.replace(stage / p.file, tmp / p.file)
        counts = {m: sum(p.stop - p.start for p in parts if p.modality == m) for m in MODALITIES}
        write_json(tmp / "manifest.json", {
            "schema_version": SCHEMA_VERSION, "kind": "shards", "dim": dim, "counts": counts,
            "shards": entries, "producer": {**producer, "built_with": "ray"}, "created": utc_now()})
    shutil.rmtree(stage)
    logger.info("committed %d parts into %s", len(parts), out_dir)
    return out_dir


def _check_part(path: Path, part: Part) -> dict:
    if not path.is_file():
        raise PcmeError(f"{path}: part missing at commit")
    table = pq.read_table(path, columns=["id", "modality"])
    ids = table.column("id").to_numpy()
    modalities = set(table.column("modality").to_pylist())
    if modalities != {part.modality} or not np.array_equal(ids, np.arange(part.start, part.stop)):
        raise PcmeError(f"{path}: does not hold exactly {part.modality} ids "
                        f"{part.start}..{part.stop - 1}")
    return {"file": part.file, "rows": len(ids), "sha256": sha256_file(path)}
