"""Two indexes of the same data searched in one process, interleaved per query: single-query
p50/p99, stage p50s, shortlist and batch QPS per score, and whether the two return the same ids.
For comparing store formats or build options on one machine at one time (the machine's noise
then hits both alike), e.g. an index built before and after a format change:

    python benchmarks/store_ab.py --a OLD_INDEX --b NEW_INDEX --scores mu,elk,bhattacharyya
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from core.served_mc import draw_all_noise
from core.process import configure_process
from engine.search import SearchEngine

STAGES = ("ann_ms", "fetch_ms", "bound_ms", "rescore_ms", "meta_ms")


def compare(a: str, b: str, scores: list[str], queries: int, rounds: int, k: int) -> dict:
    engines = {"a": SearchEngine(a), "b": SearchEngine(b)}
    _, mu, lv = engines["a"].reader.all_vectors("text")
    mu, lv = mu[:queries], lv[:queries]
    draw_all_noise(engines["a"].batch.mc_samples, engines["a"].reader.dim)
    report = {"a": a, "b": b, "queries": len(mu), "rounds": rounds, "scores": {}}
    for score in scores:
        for e in engines.values():   # warm-up: allocator, LMDB pages, FAISS
            for i in range(min(5, len(mu))):
                e.search("image", mu[i], lv[i], k, score)
        rows = {name: [] for name in engines}
        for r in range(rounds):
            for i in range(len(mu)):
                names = ("a", "b") if (i + r) % 2 == 0 else ("b", "a")   # alternate who goes first
                for name in names:
                    t = time.perf_counter()
                    _, timings, shortlist = engines[name].search("image", mu[i], lv[i], k, score)
                    rows[name].append({**timings, "total_ms": (time.perf_counter() - t) * 1000,
                                       "shortlist": shortlist})
        out = {}
        for name, e in engines.items():
            t = time.perf_counter()
            ids = e.search_batch("image", mu, lv, k, score).ids
            qps = len(mu) / (time.perf_counter() - t)
            total = [x["total_ms"] for x in rows[name]]
            out[name] = {"p50_ms": round(float(np.percentile(total, 50)), 3),
                         "p99_ms": round(float(np.percentile(total, 99)), 3),
                         "shortlist_p50": int(np.median([x["shortlist"] for x in rows[name]])),
                         "batch_qps": round(qps, 1),
                         "stages_p50_ms": {s: round(float(np.median([x.get(s, 0.0) for x in
                                                                     rows[name]])), 3)
                                           for s in STAGES},
                         "ids": ids}
        out["same_ids"] = bool(np.array_equal(out["a"].pop("ids"), out["b"].pop("ids")))
        report["scores"][score] = out
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="first index directory")
    ap.add_argument("--b", required=True, help="second index directory (same data)")
    ap.add_argument("--scores", default="mu,elk,bhattacharyya")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    configure_process()
    report = compare(args.a, args.b, args.scores.split(","), args.queries, args.rounds, args.k)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
