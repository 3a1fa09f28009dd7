"""`cli.py bench`: latency, throughput and recall of every score on one index, in one process.

On `--synthetic N --dim D` it first writes clustered synthetic shards (benchmarks/synthetic.py)
and indexes them with `build_index`, the code path of real data, timing the build. Queries
are the index's stored caption vectors (held-out synthetic queries, or a real index's
captions); with a checkpoint in the manifest the caption texts are encoded instead, which
times the encode stage too. For every score it measures
  - single queries: per-stage (encode, ann, fetch, rescore, meta) and end-to-end p50/p95/p99
    latency (end-to-end excludes encoding) and QPS, over SINGLE_ROUNDS rounds in each of
    which every score makes one timed pass over the queries (see _single_passes);
  - batches of `batch` queries through `search_batch`: QPS (median of BATCH_ROUNDS passes),
    with the scores' passes interleaved (`batch_qps`) and each score's passes back to back
    (`batch_qps_alone`): see _batch_qps;
  - recall@k of the single-query results against exhaustive search (`exact=True`) on the
    first `recall_queries` queries (fewer for mc, whose exhaustive scoring is costly).
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PcmeError
from core.served_mc import draw_all_noise
from core.process import settle_heap
from core.scores import SCORES, score_name
from engine.search import SearchEngine
from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
from indexer.build import build_index

logger = logging.getLogger(__name__)

ALL_SCORES = tuple(SCORES)
# Every query runs once untimed before the timed pass, per score: the first score measured
# otherwise pays the cold reads of its hits' metadata that the later scores find cached (μ
# p50 2.46 ms cold against 1.27 ms warm at 1M x 256), which skews every ratio to μ.
STAGES = ("encode_ms", "ann_ms", "fetch_ms", "bound_ms", "rescore_ms", "meta_ms", "total_ms")


@dataclass
class BenchConfig:
    index: Path | None = None        # an existing index directory, or
    synthetic: int | None = None     # N synthetic items written and indexed under `workdir`
    dim: int = 256
    workdir: Path = Path("bench_work")
    factory: str = "auto"
    augmented: tuple[str, ...] = ()  # also build exact csd/w2 augmented indexes (synthetic)
    scores: tuple[str, ...] = ALL_SCORES
    queries: int = 200
    batch: int = 64
    recall_queries: int = 50
    mc_recall_queries: int = 5
    k: int = 10
    recall_target: float = 0.999     # μ recall@10 the synthetic build tunes nprobe for
    shortlist: int | None = None     # fixed (calibrated) shortlist instead of the bound
    seed: int = 0
    extra: dict = field(default_factory=dict)


def run_bench(cfg: BenchConfig, open_engine=SearchEngine) -> dict:
    """`open_engine(index_dir)` -> SearchEngine; cli.py passes one that attaches the query
    encoder of the index's checkpoint, so caption texts are encoded (and timed)."""
    if (cfg.index is None) == (cfg.synthetic is None):
        raise PcmeError("bench: give either --index DIR or --synthetic N")
    cfg.scores = tuple(score_name(s, "--scores") for s in cfg.scores)
    index_dir = _prepare(cfg)
    with open_engine(index_dir) as engine:
        if cfg.shortlist is not None:
            engine.batch.initial, engine.batch.guarantee = cfg.shortlist, False
        manifest = engine.reader.manifest
        queries = _queries(engine, cfg.queries)
        report = {"n": manifest["counts"]["image"], "dim": manifest["dim"],
                  "factory": manifest["factory"]["image"], "nprobe": manifest["nprobe"]["image"],
                  "nprobe_recall": manifest.get("nprobe_recall", {}).get("image"),
                  "build_s": manifest.get("build_s"), "index_dir": str(index_dir),
                  "index_mb": round(_du(index_dir) / 2**20, 1), "queries": len(queries["mu"]),
                  "k": cfg.k, "encoded": queries["encode_ms"] is not None,
                  "shortlist": cfg.shortlist or "bounded", "scores": {}}
        timed = _single_passes(engine, cfg.scores, queries, cfg)
        for score in cfg.scores:
            logger.info("bench: %s recall", score)
            report["scores"][score] = _bench_score(engine, score, queries, cfg, *timed[score])
        logger.info("bench: batches")
        for key, rates in _batch_qps(engine, cfg.scores, queries, cfg).items():
            for score, qps in rates.items():
                report["scores"][score][key] = qps
        if "mu" in report["scores"] and "elk" in report["scores"]:
            elk, mu = report["scores"]["elk"], report["scores"]["mu"]
            report["elk_over_mu_p50"] = round(elk["p50_ms"] / mu["p50_ms"], 2)
            for key in ("batch_qps", "batch_qps_alone"):
                report[f"mu_over_elk_{key}"] = round(mu[key] / elk[key], 2)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def _prepare(cfg: BenchConfig) -> Path:
    if cfg.index is not None:
        return Path(cfg.index)
    work = Path(cfg.workdir)
    spec = SyntheticSpec(cfg.synthetic, cfg.dim, n_queries=max(cfg.queries, cfg.batch),
                         seed=cfg.seed)
    t = time.perf_counter()
    write_synthetic_shards(spec, work / "shards")
    logger.info("bench: synthetic shards written in %.1f s", time.perf_counter() - t)
    build_index(work / "shards", work / "index", cfg.factory, augmented=cfg.augmented,
                recall_target=cfg.recall_target)
    return work / "index"


def _queries(engine: SearchEngine, n: int) -> dict:
    """Stored caption vectors, or the caption texts encoded when the index names a model."""
    reader = engine.reader
    n_text = reader.count("text")
    if n_text == 0:
        raise PcmeError(f"{reader.index_dir}: bench needs caption (text) vectors as queries")
    ids = np.unique(np.linspace(0, n_text - 1, min(n, n_text)).astype(np.int64))
    if engine.encoder is not None:
        texts = [item for _, item in reader.meta("text", ids)]
        encoded, times = [], []
        for text in texts:
            t = time.perf_counter()
            mu, lv, _ = engine.encoder.encode_text(text)
            times.append((time.perf_counter() - t) * 1000)
            encoded.append((mu, lv))
        mu, lv = (np.stack([e[i] for e in encoded]).astype(np.float32) for i in (0, 1))
        return {"mu": mu, "lv": lv, "encode_ms": np.asarray(times)}
    _, mu, lv = reader.all_vectors("text")
    return {"mu": mu[ids], "lv": lv[ids], "encode_ms": None}


SINGLE_ROUNDS = 3   # timed single-query passes per score, interleaved with the other scores


def _single_passes(engine: SearchEngine, scores, q: dict, cfg) -> dict:
    """{score: (per-query timings of every round, found ids of the last round)}. Each score
    first makes one untimed pass (direct map, LMDB pages, allocator, compiled kernels), then
    in each of SINGLE_ROUNDS rounds every score makes one timed pass over the queries, so a
    ratio between scores compares the same minutes: this machine's speed drifts by up to 2x
    within minutes, and with one pass per score, score after score, the elk/μ p50 ratio of
    one index went 1.06-2.14 over six runs of one command."""
    mu, lv = q["mu"], q["lv"]
    draw_all_noise(engine.batch.mc_samples, engine.reader.dim)   # as the service's start-up
    for score in scores:
        for i in range(len(mu)):
            engine.search("image", mu[i], lv[i], cfg.k, score)
    settle_heap()   # as the service after start-up: no full collection inside a timed query
    out = {score: ([], []) for score in scores}
    for r in range(SINGLE_ROUNDS):
        for score in scores:
            logger.info("bench: %s, round %d of %d", score, r + 1, SINGLE_ROUNDS)
            rows, found = out[score][0], []
            for i in range(len(mu)):
                t = time.perf_counter()
                hits, timings, shortlist = engine.search("image", mu[i], lv[i], cfg.k, score)
                timings["total_ms"] = (time.perf_counter() - t) * 1000
                timings["shortlist"], timings["round"] = shortlist, r
                rows.append(timings)
                found.append([h.id for h in hits])
            out[score] = (rows, found)
    return out


def _bench_score(engine: SearchEngine, score: str, q: dict, cfg: BenchConfig, rows: list,
                 found: list) -> dict:
    mu, lv = q["mu"], q["lv"]
    total = np.asarray([r["total_ms"] for r in rows])
    out = {"p50_ms": _r(np.percentile(total, 50)), "p95_ms": _r(np.percentile(total, 95)),
           "p99_ms": _r(np.percentile(total, 99)), "qps": _r(1000 / total.mean()),
           "p50_ms_rounds": [_r(np.median([x["total_ms"] for x in rows if x["round"] == r]))
                             for r in range(SINGLE_ROUNDS)],
           "stages_p50_ms": {s: _r(np.median([r.get(s, 0.0) for r in rows])) for s in STAGES[1:]},
           "shortlist_p50": int(np.median([r["shortlist"] for r in rows])),
           "shortlist_max": int(max(r["shortlist"] for r in rows))}
    if score != "mu":  # σ store cost per fetched key (μ reconstruct/read + float16 log_var)
        out["fetch_us_per_key"] = _r(np.median([1000 * r.get("fetch_ms", 0.0) / r["shortlist"]
                                                for r in rows]))
    if q["encode_ms"] is not None:
        out["stages_p50_ms"]["encode_ms"] = _r(np.median(q["encode_ms"]))
    n_rec = min(len(mu), cfg.mc_recall_queries if score == "mc" else cfg.recall_queries)
    t = time.perf_counter()
    exact = engine.search_batch("image", mu[:n_rec], lv[:n_rec], cfg.k, score, exact=True)
    out["exact_ms_per_query"] = _r((time.perf_counter() - t) * 1000 / max(n_rec, 1))
    out["recall@10"] = _r(_recall(found[:n_rec], exact.ids), 4)
    out["recall_queries"] = n_rec
    return out


BATCH_ROUNDS = 9   # timed passes over the queries in batches, per score; the median is reported


def _batch_qps(engine, scores, q: dict, cfg) -> dict:
    """{"batch_qps": {score: QPS}, "batch_qps_alone": {score: QPS}}. One untimed batch per
    score (thread start-up, first reads), then passes over the queries in batches of cfg.batch
    (a pass of 64 queries is one ~10 ms call, too short to time once), the median of
    BATCH_ROUNDS per score: first in rounds in each of which every score makes one pass
    (`batch_qps`: the scores' ratios compare the same moments, which matters because this
    machine's throughput drifts by up to 2x within minutes), then each score's passes back to
    back (`batch_qps_alone`: one kind of query at a time). The two differ most for μ (FAISS):
    11,600 back to back against 7,400-8,500 interleaved at 1M x 256, elk 5,750 against 5,250."""
    mu, lv = q["mu"], q["lv"]

    def one_pass(score: str) -> float:
        t = time.perf_counter()
        for s in range(0, len(mu), cfg.batch):
            engine.search_batch("image", mu[s:s + cfg.batch], lv[s:s + cfg.batch], cfg.k, score)
        return len(mu) / (time.perf_counter() - t)

    for score in scores:
        engine.search_batch("image", mu[:cfg.batch], lv[:cfg.batch], cfg.k, score)
    settle_heap()
    mixed = {score: [] for score in scores}
    for _ in range(BATCH_ROUNDS):
        for score in scores:
            mixed[score].append(one_pass(score))
    alone = {score: [one_pass(score) for _ in range(BATCH_ROUNDS)] for score in scores}
    return {key: {score: _r(float(np.median(r))) for score, r in rates.items()}
            for key, rates in (("batch_qps", mixed), ("batch_qps_alone", alone))}


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in its returned top-k."""
    hits = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth.tolist())]
    return float(np.mean(hits)) if hits else float("nan")


def _du(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def format_table(report: dict) -> str:
    """The report as a plain-text table (what `bench` prints without --json)."""
    head = (f"N={report['n']} D={report['dim']} factory={report['factory']} "
            f"nprobe={report['nprobe']} build={report['build_s']} s index={report['index_mb']} MB "
            f"peak RSS={report.get('peak_rss_mb')} MB queries={report['queries']} k={report['k']} "
            f"shortlist={report['shortlist']}")
    # latencies per query in ms (stages: p50), throughput in queries/s, shortlist in items
    cols = ("p50 ms", "p95 ms", "p99 ms", "qps", "batch qps", "batch alone", "ann ms",
            "fetch ms", "bound ms", "rescore ms", "meta ms", "shortlist", "recall@10")
    lines = [head, f"{'score':<14}" + "".join(f"{c:>11}" for c in cols)]
    for name, s in report["scores"].items():
        st = s["stages_p50_ms"]
        vals = (s["p50_ms"], s["p95_ms"], s["p99_ms"], s["qps"], s["batch_qps"],
                s["batch_qps_alone"], st["ann_ms"],
                st["fetch_ms"], st["bound_ms"], st["rescore_ms"], st["meta_ms"], s["shortlist_p50"],
                s["recall@10"])
        lines.append(f"{name:<14}" + "".join(f"{v:>11.3f}" if isinstance(v, float) else f"{v:>11}"
                                             for v in vals))
    if "elk_over_mu_p50" in report:
        lines.append(f"elk p50 / mu p50 = {report['elk_over_mu_p50']}; mu batch qps / elk: "
                     f"{report['mu_over_elk_batch_qps']} interleaved, "
                     f"{report['mu_over_elk_batch_qps_alone']} alone")
    return "\n".join(lines)
