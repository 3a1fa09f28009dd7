"""Query latency of an index, per stage and per score, in one process.

Opens the engine once (model load is reported separately), then runs each query text once per
score and prints median and p95 of every stage (encode, ANN, σ fetch, rescore, total) in ms.

    python benchmarks/query_latency.py [--index index] [--queries 200] [--scores mu,elk,csd,mc]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from encoders.model.query import QueryEncoder
from engine.search import SearchEngine

STAGES = ("encode_ms", "ann_ms", "fetch_ms", "rescore_ms", "total_ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="index")
    ap.add_argument("--queries", type=int, default=200, help="caption texts taken from the index")
    ap.add_argument("--scores", default="mu,elk,csd,w2,mc")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    with SearchEngine(args.index, make_encoder=QueryEncoder.for_index) as engine:
        load_ms = (time.perf_counter() - t) * 1000
        n_text = engine.reader.count("text")
        ids = np.linspace(0, n_text - 1, min(args.queries, n_text)).astype(np.int64)
        texts = [item for _, item in engine.reader.meta("text", ids)]
        engine.query_text(texts[0], args.k, "elk")  # warm-up
        report = {"index": args.index, "n_images": engine.reader.count("image"),
                  "queries": len(texts), "k": args.k, "model_load_ms": round(load_ms, 1), "scores": {}}
        for score in args.scores.split(","):
            rows = [engine.query_text(q, args.k, score).timings_ms for q in texts]
            report["scores"][score] = {
                stage: {"p50": round(float(np.median([r[stage] for r in rows])), 3),
                        "p95": round(float(np.percentile([r[stage] for r in rows], 95)), 3)}
                for stage in STAGES}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['n_images']} images, {report['queries']} text queries, k={args.k}, "
          f"model load {report['model_load_ms']} ms (once)")
    print(f"{'score':<6}" + "".join(f"{s[:-3]:>18}" for s in STAGES) + "   (p50 / p95 ms)")
    for score, st in report["scores"].items():
        print(f"{score:<6}" + "".join(f"{st[s]['p50']:>9.2f}/{st[s]['p95']:<8.2f}" for s in STAGES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
