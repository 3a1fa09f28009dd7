"""`index --ray`: the index built by Ray tasks in parts, then merged (or kept as shards).

  1. driver: the same plan, validation pass, training sample and quantizer training as
     build_index (indexer/build.py), so the trained empty index is the one it would train;
  2. workers, one task per part (a contiguous id range of one modality): a copy of the trained
     empty index gets the part's rows with part-local ids 0..n-1, next to its own LMDB store
     part, its variance statistics and its exact top-k of the recall probes. Each part is an
     ordinary index directory (written atomically, so a retried task replaces it);
  3. driver: inverted lists merged on disk (faiss OnDiskInvertedLists: the driver never holds
     the codes; each part's ids are shifted by the rows before it, giving the global ids),
     nprobe tuned on the merged lists exactly as today, and then either
       - one index: the store parts copied in id order into one store, the parts removed; or
       - a sharded index (`sharded=True`): the parts kept as shard directories under a
         `sharded-index` manifest, searched by engine/sharded.py.
Part boundaries are multiples of the Monte-Carlo noise period (core.constants.NOISE_ROWS),
so a shard's local id selects the same `mc` noise as the global id: every score of the
contract is then the same number in a shard as in the merged index.
"""
from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from core.atomic import AtomicDir, sha256_file, utc_now, write_json
from core.cluster import fault_point, import_ray
from core.errors import PcmeError
from core.constants import MC_SAMPLES, NOISE_ROWS
from indexer import build as B
from indexer import faiss_index as fx
from indexer.manifest import SCHEMA_VERSION, build_stamp
from indexer.shards import MODALITIES, ShardBatch, read_files, read_shard_manifest, validate_shards
from indexer.store import StoreWriter, estimate_map_size
from indexer.variance import VarianceStats

logger = logging.getLogger(__name__)

PART_ROWS = 256 * NOISE_ROWS   # ~1M rows per part: minutes of adding, a few hundred MB of codes
MAX_RETRIES = 3                # a part task whose worker dies is run again up to this often
SHARDED_KIND = "sharded-index"


@dataclass(frozen=True)
class IndexPart:
    modality: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.modality}-{self.start:012d}"


def plan_parts(counts: dict[str, int], rows: int = PART_ROWS) -> list[IndexPart]:
    if rows < 1 or rows % NOISE_ROWS:
        raise PcmeError(f"--part-rows {rows}: must be a positive multiple of {NOISE_ROWS}")
    return [IndexPart(m, s, min(s + rows, counts[m])) for m in MODALITIES
            for s in range(0, counts.get(m, 0), rows)]


class FileLayout:
    """Which id range of each modality every shard file holds (seen in the validation pass),
    so a part task reads only the files that overlap its range."""

    def __init__(self):
        self.ranges: dict[str, dict[str, list[int]]] = {}

    def see(self, batch: ShardBatch) -> None:
        per_file = self.ranges.setdefault(batch.file, {})
        for m in MODALITIES:
            ids = batch.ids[batch.modality == m]
            if len(ids):
                lo, hi = per_file.get(m, (int(ids[0]), int(ids[0])))
                per_file[m] = [min(lo, int(ids.min())), max(hi, int(ids.max()) + 1)]

    def files_for(self, part: IndexPart) -> list[str]:
        return [f for f, r in self.ranges.items()
                if part.modality in r and r[part.modality][0] < part.stop
                and r[part.modality][1] > part.start]


def build_part(index_bytes: np.ndarray, shard_dir: str, files: list[str], dim: int,
               part: IndexPart, out_dir: str, edges: np.ndarray,
               probes: np.ndarray | None, k: int, list_blocks: bool = True) -> dict:
    """The worker's task: one part as an ordinary index directory with local ids (with its
    own list blocks when it is to be served as a shard, `list_blocks`)."""
    fault_point(f"index-{part.name}")
    index, m, n = faiss.deserialize_index(index_bytes), part.modality, part.stop - part.start
    stats, exact = VarianceStats(dim, edges), (fx.ExactTopK(probes, k) if probes is not None else None)
    added, worst_norm = 0, 0.0
    with AtomicDir(Path(out_dir), kind="index-part") as tmp:
        # a part served as a shard gets the final layout; a part to be merged keeps its rows by id
        store = StoreWriter(tmp / B.STORE_FILE, estimate_map_size(n, dim, 128 * n),
                            rows_path=tmp / B.ROWS_FILE if list_blocks else None)
        try:
            for batch in read_files(Path(shard_dir), files, dim):
                keep = (batch.modality == m) & (batch.ids >= part.start) & (batch.ids < part.stop)
                rows = np.flatnonzero(keep)
                if not len(rows):
                    continue
                ids, mu, lv = batch.ids[rows], batch.mu[rows], batch.log_var[rows]
                local = ids - part.start
                fx.add(index, mu, local)
                store.put(m, local, mu, lv, batch.groups[rows], [batch.items[i] for i in rows])
                stats.update(mu, lv)
                if exact is not None:
                    exact.update(mu, ids)
                worst_norm = max(worst_norm, float(np.abs(np.einsum("ij,ij->i", mu, mu) - 1).max()))
                added += len(rows)
        finally:
            store.close()
        if added != n:
            raise PcmeError(f"{shard_dir}: part {part.name} found {added} rows, expected {n}")
        if list_blocks:
            B.finish_store(tmp, {m: index}, dim)
        faiss.write_index(index, str(tmp / f"{m}.faiss"))
        write_json(tmp / "manifest.json", {"schema_version": SCHEMA_VERSION, "kind": "index-part",
                                           "part": vars(part), "created": utc_now()})
    return {"stats": stats, "exact": None if exact is None else (exact.scores, exact.ids),
            "worst_norm": worst_norm, "peak_rss_mb": peak_rss_mb()}


def build_index_distributed(shard_dir: Path, out_dir: Path, factory: str = "auto",
                            nprobe: int | None = None, progress: B.Progress | None = None,
                            seed: int = 0, recall_target: float = B.RECALL_TARGET,
                            part_rows: int | None = None, sharded: bool = False) -> dict:
    """Build on the connected Ray cluster; same arguments as build_index (no augmented
    indexes). Returns the manifest written."""
    ray = import_ray()
    if not 0.0 < recall_target <= 1.0:
        raise PcmeError(f"recall target {recall_target}: must be in (0, 1]")
    if nprobe is not None and nprobe < 1:
        raise PcmeError(f"--nprobe {nprobe}: must be >= 1")
    start, shard_dir = time.perf_counter(), Path(shard_dir).absolute()
    shard_manifest = read_shard_manifest(shard_dir)
    dim, counts = shard_manifest["dim"], {m: shard_manifest["counts"].get(m, 0) for m in MODALITIES}
    present = [m for m in MODALITIES if counts[m] > 0]
    if not present:
        raise PcmeError(f"{shard_dir}: the shards hold no rows; nothing to index")
    parts = plan_parts({m: counts[m] for m in present}, part_rows or PART_ROWS)
    rng = np.random.default_rng(seed)
    with AtomicDir(out_dir, kind=SHARDED_KIND if sharded else "index") as tmp:
        plans = {m: B._plan(m, counts, dim, factory, nprobe is None, rng) for m in present}
        layout, gather = FileLayout(), B._sample_gatherer(plans, dim, progress)
        validate_shards(shard_dir, on_batch=lambda b: (gather(b), layout.see(b)))
        shard_sha = sha256_file(shard_dir / "manifest.json")
        B._train(plans)
        part_root = tmp if sharded else tmp / "parts"
        part_root.mkdir(exist_ok=True)
        results = _run_parts(ray, shard_dir, plans, parts, layout, part_root, dim, progress,
                             list_blocks=sharded)  # a merged store gets its blocks after
        _collect(parts, plans, results)  # the plans' stats are empty until now
        tune = tmp / ".tune" if sharded else tmp
        tune.mkdir(exist_ok=True)
        for m, p in plans.items():
            mine = [q for q in parts if q.modality == m]
            p.index = _merge_lists(p.index, [part_root / q.name for q in mine],
                                   [q.start for q in mine], m, tune)
        chosen = {m: B._nprobe(p, nprobe, recall_target) for m, p in plans.items()}
        producer = shard_manifest.get("producer", {})
        build = {"ray": {"parts": [vars(q) for q in parts], "workers": _workers(ray),
                         "worker_peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
                         "merge": "sharded" if sharded else "faiss on-disk inverted lists"}}
        if sharded:
            shutil.rmtree(tune)
            manifest = _write_sharded(tmp, parts, results, plans, chosen, counts, dim,
                                      recall_target, shard_dir, shard_sha, producer, start)
        else:
            _merge_stores(tmp, parts, plans, dim)
            B.finish_store(tmp, {m: p.index for m, p in plans.items()}, dim)
            for m, p in plans.items():
                faiss.write_index(p.index, str(tmp / f"{m}.faiss"))
            shutil.rmtree(part_root)
            manifest = B.index_manifest(plans, chosen, counts, dim, recall_target, shard_dir,
                                        shard_sha, producer, start)
            manifest["ivf_data"] = {m: f"{m}.ivfdata" for m in plans if (tmp / f"{m}.ivfdata").exists()}
        manifest["build"] = build
        manifest["build_s"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "manifest.json", manifest)  # last: its presence marks a complete build
    logger.info("distributed index built in %.1f s from %d parts", manifest["build_s"], len(parts))
    return manifest


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _workers(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def _run_parts(ray, shard_dir, plans, parts, layout, part_root, dim, progress,
               list_blocks: bool) -> dict:
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(build_part)
    shipped = {m: ray.put(faiss.serialize_index(p.index)) for m, p in plans.items()}
    refs = {}
    for q in parts:
        p = plans[q.modality]
        probes = p.probes if p.exact is not None else None
        refs[task.remote(shipped[q.modality], str(shard_dir), layout.files_for(q), dim, q,
                         str(part_root / q.name), p.stats.edges, probes,
                         p.exact.k if p.exact is not None else 0, list_blocks)] = q
    total, done, results = sum(q.stop - q.start for q in parts), 0, {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        q = refs[ready[0]]
        results[q.name] = ray.get(ready[0])  # a task that failed for good raises here
        done += q.stop - q.start
        if progress is not None:
            progress("add", done, total)
    for stale in part_root.glob(".*.tmp-*"):  # left by a worker that died mid-part
        shutil.rmtree(stale, ignore_errors=True)
    return results


def _collect(parts: list[IndexPart], plans: dict, results: dict) -> None:
    """Fold every part's variance stats and probe top-k into its modality's plan."""
    worst = 0.0
    for q in parts:
        r, p = results[q.name], plans[q.modality]
        p.stats.merge(r["stats"])
        if r["exact"] is not None:
            p.exact.merge(*r["exact"])
        worst = max(worst, r["worst_norm"])
    if worst > 1e-3:  # inner product equals cosine only for unit vectors
        logger.warning("μ is not L2-normalised (max |‖μ‖²-1| = %.3g)", worst)


def _merge_lists(trained: faiss.Index, part_dirs: list[Path], offsets: list[int], m: str,
                 where: Path) -> faiss.Index:
    """The parts' vectors in the trained index, in part order. IVF: inverted lists merged into
    `<m>.ivfdata` on disk (parts memory-mapped, codes never all in memory), then each part's
    local ids shifted by its first global id; other indexes are merged in memory."""
    ivf = fx.ivf_of(trained)
    if ivf is None:  # no ids stored: rows are numbered in merge order = id order
        merged = faiss.read_index(str(part_dirs[0] / f"{m}.faiss"))  # as read: same C++ type
        for d in part_dirs[1:]:
            merged.merge_from(faiss.read_index(str(d / f"{m}.faiss")))
        return merged
    opened = [faiss.read_index(str(d / f"{m}.faiss"), faiss.IO_FLAG_MMAP) for d in part_dirs]
    lists = faiss.InvertedListsPtrVector()
    for index in opened:
        lists.push_back(fx.ivf_of(index).invlists)
    sizes = np.array([[fx.ivf_of(x).invlists.list_size(l) for l in range(ivf.nlist)]
                      for x in opened], np.int64).reshape(len(opened), ivf.nlist)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(where / f"{m}.ivfdata"))
    # list l of the merge = list l of part 0, then of part 1, ...: entries keep part order
    ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
    shift = np.asarray(offsets, np.int64)
    for l in np.flatnonzero(sizes.sum(axis=0)):
        n = ondisk.list_size(int(l))
        ids = faiss.rev_swig_ptr(ondisk.get_ids(int(l)), n).copy() + np.repeat(shift, sizes[:, l])
        codes = faiss.rev_swig_ptr(ondisk.get_codes(int(l)), n * ivf.code_size).copy()
        ondisk.update_entries(int(l), 0, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns it now
    del opened
    return trained


def _merge_stores(tmp: Path, parts: list[IndexPart], plans: dict, dim: int) -> None:
    total = sum(q.stop - q.start for q in parts)
    store = StoreWriter(tmp / B.STORE_FILE, estimate_map_size(total, dim, 128 * total),
                        rows_path=tmp / B.ROWS_FILE)   # rows by id until B.finish_store
    try:
        for q in parts:  # modality by modality, parts in id order: appends stay sorted
            names = ("vec", "meta")   # exact μ + log σ² in one row by id, and metadata
            store.copy_from(tmp / "parts" / q.name / B.STORE_FILE, q.modality, q.start, names)
    finally:
        store.close()


def _write_sharded(tmp, parts, results, plans, chosen, counts, dim, recall_target, shard_dir,
                   shard_sha, producer, start) -> dict:
    """Each part becomes a complete index directory (its own σ ranges, the shared nprobe);
    the top manifest lists them with the global id each one's local id 0 stands for."""
    for q in parts:
        p = plans[q.modality]
        one = B.index_manifest({q.modality: p}, {q.modality: chosen[q.modality]},
                               {q.modality: q.stop - q.start}, dim, recall_target, shard_dir,
                               shard_sha, producer, start)
        one["variance_stats"] = {q.modality: results[q.name]["stats"].to_json()}
        one["part"] = {"modality": q.modality, "id_offset": q.start}
        write_json(tmp / q.name / "manifest.json", one)
    return {"schema_version": SCHEMA_VERSION, "kind": SHARDED_KIND, "dim": dim, "counts": counts,
            "factory": {m: p.factory for m, p in plans.items()}, "mc_samples": MC_SAMPLES,
            "nprobe": {m: c[0] for m, c in chosen.items()},
            "shards": [{"dir": q.name, "modality": q.modality, "id_offset": q.start,
                        "count": q.stop - q.start} for q in parts],
            "shards_source": {"dir": str(shard_dir), "manifest_sha256": shard_sha},
            "producer": producer, **build_stamp()}
