"""Build an index directory from a shard directory.

Stages (each streams the shards; nothing holds all rows of a modality except FAISS itself):
  1. choose each modality's factory from the manifest counts, and which ids to sample;
  2. validate the shards (hashes, schema, values, ids) and, in the same pass, copy out the
     seeded random training sample and ~200 probe queries;
  3. train each FAISS index (k-means on the GPUs when faiss sees any);
  4. add every row to FAISS, its metadata to the LMDB store and its exact μ and log σ² (one
     row per id) to a temporary rows store, keeping the probes' exact top-10 and the variance
     ranges per stratum (for the engine's shortlist bounds) on the side, and to the optional
     augmented CSD/W2 indexes;
  5. group the rows by inverted list into the store (indexer/lists.py) and drop the rows
     store; a modality without inverted lists keeps its rows by id;
  6. choose nprobe by measured recall@10, write the FAISS files and, last, the manifest.
All of it happens in a temp sibling dir that replaces `out_dir` only when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from core.errors import PcmeError
from indexer import augmented as aug
from indexer import faiss_index as fx
from core.constants import MC_SAMPLES
from core.atomic import AtomicDir, sha256_file, write_json
from indexer.manifest import SCHEMA_VERSION, build_stamp
from indexer.shards import MODALITIES, ShardBatch, read_shard_manifest, read_shards, validate_shards
from indexer.store import STORE_FORMAT, StoreWriter, estimate_map_size, stored_log_var
from indexer.blocks import codes_for
from indexer.lists import write_list_blocks
from indexer.variance import VarianceStats

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, rows done, rows total)
N_PROBES, RECALL_K, RECALL_TARGET = 200, 10, 0.95
VARIANCE_STRATA = 16  # strata of Σ log v for the engine's shortlist bounds (store.VarianceStats)
STORE_FILE = "store.lmdb"
ROWS_FILE = "rows.lmdb"   # the add pass's rows by id, until finish_store groups them by list


@dataclass
class _Plan:
    """Everything decided about one modality's index before rows are added."""
    modality: str
    n: int
    factory: str
    index: faiss.Index
    train_ids: np.ndarray           # sorted ids of the training sample
    probe_source: str               # modality the recall probes are drawn from
    probe_ids: np.ndarray           # sorted ids of the probes (empty when nprobe is not measured)
    train: np.ndarray | None = None
    probes: np.ndarray | None = None
    exact: fx.ExactTopK | None = None
    stats: VarianceStats | None = None          # σ ranges for the engine's shortlist bounds
    train_lv_sum: np.ndarray | None = None      # Σ log v of the training rows: stratum edges
    augmented: dict | None = None               # score -> exact augmented-vector index


def build_index(shard_dir: Path, out_dir: Path, factory: str = "auto", nprobe: int | None = None,
                progress: Progress | None = None, seed: int = 0,
                augmented: tuple[str, ...] = (), recall_target: float = RECALL_TARGET) -> dict:
    """Validate `shard_dir`, build FAISS + LMDB + manifest, atomically replace `out_dir`.
    `factory` "auto" picks per modality from its count; any other string goes to FAISS as is.
    `nprobe` None measures it per modality; an int is used as given (capped at nlist).
    `augmented` names scores ("csd", "w2") to also index exactly by augmented vectors.
    `recall_target`: recall@10 of the μ ranking that the measured nprobe must reach."""
    if not 0.0 < recall_target <= 1.0:
        raise PcmeError(f"recall target {recall_target}: must be in (0, 1]")
    aug.check_scores(augmented)
    start = time.perf_counter()
    shard_dir = Path(shard_dir).absolute()
    if nprobe is not None and nprobe < 1:
        raise PcmeError(f"--nprobe {nprobe}: must be >= 1")
    shard_manifest = read_shard_manifest(shard_dir)  # counts are checked by validate below
    dim, counts = shard_manifest["dim"], {m: shard_manifest["counts"].get(m, 0) for m in MODALITIES}
    present = [m for m in MODALITIES if counts[m] > 0]
    if not present:
        raise PcmeError(f"{shard_dir}: the shards hold no rows; nothing to index")
    rng = np.random.default_rng(seed)
    with AtomicDir(out_dir, kind="index") as tmp:  # first: refuse a foreign out_dir early
        plans = {m: _plan(m, counts, dim, factory, nprobe is None, rng) for m in present}
        for p in plans.values():
            p.augmented = {s: aug.make_index(s, dim) for s in augmented}
        validate_shards(shard_dir, on_batch=_sample_gatherer(plans, dim, progress))
        shard_sha = sha256_file(shard_dir / "manifest.json")
        _train(plans)
        _add_all(shard_dir, tmp, plans, dim, progress)
        finish_store(tmp, {m: p.index for m, p in plans.items()}, dim)
        chosen = {m: _nprobe(p, nprobe, recall_target) for m, p in plans.items()}
        for m, p in plans.items():
            faiss.write_index(p.index, str(tmp / f"{m}.faiss"))
            for score, index in p.augmented.items():
                faiss.write_index(index, str(tmp / aug.file_name(m, score)))
        manifest = index_manifest(plans, chosen, counts, dim, recall_target, shard_dir,
                                  shard_sha, shard_manifest.get("producer", {}), start)
        write_json(tmp / "manifest.json", manifest)  # last: its presence marks a complete build
    logger.info("index built in %.1f s: %s", manifest["build_s"], manifest["factory"])
    return manifest


def index_manifest(plans: dict, chosen: dict, counts: dict, dim: int, recall_target: float,
                   shard_dir: Path, shard_sha: str, producer: dict, start: float) -> dict:
    """The manifest of an index directory (DESIGN.md "Formats"), written last by a build."""
    return {
        "schema_version": SCHEMA_VERSION, "kind": "index", "dim": dim, "counts": counts,
        "factory": {m: p.factory for m, p in plans.items()},
        "nprobe": {m: c[0] for m, c in chosen.items()},
        "nprobe_recall": {m: c[1] for m, c in chosen.items()}, "recall_target": recall_target,
        "metric": "inner_product", "mc_samples": MC_SAMPLES,
        "variance_stats": {m: p.stats.to_json() for m, p in plans.items()},
        "augmented": {m: sorted(p.augmented or {}) for m, p in plans.items()},
        "store": {"file": STORE_FILE, "format": STORE_FORMAT,
                  "row": "mu float32[dim] + log_var float16[dim]",
                  "lists": sorted(m for m, p in plans.items() if fx.ivf_of(p.index) is not None),
                  "mu_codes": sorted(m for m, p in plans.items() if fx.ivf_of(p.index) is not None
                                     and codes_for(counts[m], dim))},
        "shards": {"dir": str(shard_dir), "manifest_sha256": shard_sha},
        "producer": producer, **build_stamp(), "calibration": read_calibration(producer),
        "build_s": round(time.perf_counter() - start, 3)}


def _plan(m: str, counts: dict, dim: int, factory: str, measure: bool, rng) -> _Plan:
    n = counts[m]
    name = fx.choose_factory(n, dim) if factory == "auto" else factory
    index = fx.make_index(name, dim)
    train_ids = np.sort(rng.choice(n, fx.train_size(index, n), replace=False))
    other = [o for o in MODALITIES if o != m and counts[o] > 0]
    source = other[0] if other else m  # cross-modal probes match how the index is queried
    probe_ids = np.zeros(0, np.int64)
    if measure and fx.ivf_of(index) is not None:
        pool = np.arange(counts[source])
        if source == m:  # held out from training where possible
            pool = np.setdiff1d(pool, train_ids) if len(train_ids) < n else pool
        probe_ids = np.sort(rng.choice(pool, min(N_PROBES, len(pool)), replace=False))
    logger.info("%s: %d vectors, factory %s, %d training rows", m, n, name, len(train_ids))
    return _Plan(m, n, name, index, train_ids, source, probe_ids)


def _sample_gatherer(plans: dict[str, _Plan], dim: int,
                     progress: Progress | None) -> Callable[[ShardBatch], None]:
    """A per-batch callback that copies out the μ rows whose ids were sampled."""
    wanted = [(p, "train", p.modality, p.train_ids) for p in plans.values()]
    wanted += [(p, "probes", p.probe_source, p.probe_ids) for p in plans.values()]
    for p, attr, _, ids in wanted:
        setattr(p, attr, np.empty((len(ids), dim), np.float32))
        p.train_lv_sum = np.empty(len(p.train_ids))
    seen, total = [0], sum(p.n for p in plans.values())

    def gather(batch: ShardBatch) -> None:
        seen[0] += len(batch)
        if progress is not None:
            progress("validate", seen[0], total)
        for p, attr, modality, ids in wanted:
            rows = np.flatnonzero(batch.modality == modality)
            pos = np.searchsorted(ids, batch.ids[rows])
            hit = pos < len(ids)
            hit[hit] = ids[pos[hit]] == batch.ids[rows[hit]]
            getattr(p, attr)[pos[hit]] = batch.mu[rows[hit]]
            if attr == "train":
                p.train_lv_sum[pos[hit]] = stored_log_var(batch.log_var[rows[hit]]).sum(axis=1)
    return gather


def _train(plans: dict[str, _Plan]) -> None:
    for p in plans.values():
        t = time.perf_counter()
        fx.train(p.index, p.train, p.factory)
        edges = np.quantile(p.train_lv_sum, np.linspace(0, 1, VARIANCE_STRATA + 1)[1:-1])
        p.stats = VarianceStats(p.train.shape[1], np.unique(edges))
        if len(p.probe_ids):
            p.exact = fx.ExactTopK(p.probes, min(RECALL_K, p.n))
        logger.info("%s: trained in %.1f s", p.modality, time.perf_counter() - t)
        p.train = None  # free the sample before the big pass


def _add_all(shard_dir: Path, tmp: Path, plans: dict[str, _Plan], dim: int,
             progress: Progress | None) -> None:
    """Stream every row into FAISS, the store (metadata), the rows store and the probes'
    exact top-k."""
    total = sum(p.n for p in plans.values())
    store = StoreWriter(tmp / STORE_FILE, estimate_map_size(total, dim, 128 * total),
                        rows_path=tmp / ROWS_FILE)
    done, worst_norm, t = 0, 0.0, time.perf_counter()
    try:
        for batch in read_shards(shard_dir):
            for m, p in plans.items():
                b = batch.select(m)
                if not len(b):
                    continue
                fx.add(p.index, b.mu, b.ids)
                store.put(m, b.ids, b.mu, b.log_var, b.groups, b.items)
                if p.exact is not None:
                    p.exact.update(b.mu, b.ids)
                p.stats.update(b.mu, b.log_var)
                for score, index in p.augmented.items():
                    index.add(aug.item_vectors(score, b.mu, b.log_var))
                norms = np.einsum("ij,ij->i", b.mu, b.mu)
                worst_norm = max(worst_norm, float(np.abs(norms - 1.0).max()))
                done += len(b)
            if progress is not None:
                progress("add", done, total)
    finally:
        store.close()
    if worst_norm > 1e-3:  # inner product equals cosine only for unit vectors
        logger.warning("μ is not L2-normalised (max |‖μ‖²-1| = %.3g)", worst_norm)
    logger.info("added %d vectors in %.1f s", done, time.perf_counter() - t)


def finish_store(tmp: Path, indexes: dict, dim: int) -> None:
    """Move the rows of the rows store (tmp/ROWS_FILE) into the store (tmp/STORE_FILE): grouped
    by inverted list for every modality with an IVF index (store format 5), by id for the
    others; then delete the rows store."""
    store_path, rows_path = tmp / STORE_FILE, tmp / ROWS_FILE
    for m, index in indexes.items():
        t = time.perf_counter()
        if fx.ivf_of(index) is not None:
            write_list_blocks(store_path, rows_path, m, index, dim)
            logger.info("%s: list blocks written in %.1f s", m, time.perf_counter() - t)
            continue
        store = StoreWriter(store_path, (store_path / "data.mdb").stat().st_size)
        try:
            store.copy_from(rows_path, m, 0, ("vec",))
        finally:
            store.close()
    shutil.rmtree(rows_path)


def _nprobe(p: _Plan, override: int | None, target: float) -> tuple[int | None, float | None]:
    """(nprobe, measured recall@10); (None, None) for indexes without inverted lists."""
    ivf = fx.ivf_of(p.index)
    if ivf is None:
        return None, None
    if override is not None:
        return min(override, ivf.nlist), None
    nprobe, recall = fx.choose_nprobe(p.index, p.probes, p.exact.ids, target)
    logger.info("%s: nprobe %d (recall@%d %.3f vs brute force)", p.modality, nprobe,
                p.exact.k, recall)
    return nprobe, round(recall, 4)


def read_calibration(producer: dict) -> dict:
    """The σ → R@1 tables that eval measured for the index's checkpoint, per query modality
    ({"text": {"score", "bins"}, "image": ...}; engine/confidence.py reads them): taken from
    the eval.json beside the checkpoint when it was made for that very checkpoint (same
    sha256), else {} (queries then report no confidence)."""
    path, sha = producer.get("checkpoint"), producer.get("checkpoint_sha256")
    report_path = Path(path).parent / "eval.json" if path else None
    if not sha or report_path is None or not report_path.is_file():
        return {}
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        logger.warning("%s: unreadable; the index gets no confidence calibration", report_path)
        return {}
    if report.get("checkpoint_sha256") != sha:
        logger.info("%s: made for another checkpoint; no confidence calibration", report_path)
        return {}
    tables = {"text": report.get("uncertainty"), "image": report.get("uncertainty_i2t")}
    return {m: {"score": t.get("score"), "split": report.get("split"), "bins": t["bins"],
                "source": str(report_path)}
            for m, t in tables.items() if isinstance(t, dict) and t.get("bins")}
