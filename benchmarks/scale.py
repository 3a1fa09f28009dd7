"""Cost curves: build and search the same synthetic distribution at several sizes.

    python -m benchmarks.scale --sizes 100000,1000000,10000000 --dim 256 \
        --workdir scale_work --out scale.json --plot scale.png

Each size runs in a child process of its own (`--one N`), so the peak RSS it reports is that
size's alone. A child writes synthetic shards and builds the index with `build_index` (factory
"auto": IVF,Flat up to 2M, IVF,SQ8 with exact μ/σ in the LMDB store from 2M, an HNSW coarse
quantizer from 4M; shards are streamed, the store is memory-mapped), deletes the shards, and
runs the `cli.py bench` harness on the index: p50/p99 per score and recall@10 against
exhaustive scoring on sampled queries (exhaustive search streams the store beyond 4 GiB, and
the number of sampled queries shrinks with N so a size costs about the same in exact scoring).
The parent fits p50 ∝ N^b per score (least squares in log-log) and draws p50 against N.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.process import configure_process
from benchmarks.harness import ALL_SCORES, BenchConfig, _prepare, run_bench

logger = logging.getLogger(__name__)

RECALL_BUDGET = 50_000_000   # items × queries of exhaustive scoring per score (mc: a tenth)


def measure_one(n: int, dim: int, workdir: Path, queries: int, scores: tuple[str, ...]) -> dict:
    cfg = BenchConfig(synthetic=n, dim=dim, workdir=workdir, queries=queries, scores=scores,
                      recall_queries=max(3, min(50, RECALL_BUDGET // n)),
                      mc_recall_queries=max(1, min(5, RECALL_BUDGET // (10 * n))))
    t = time.perf_counter()
    index_dir = _prepare(cfg)
    prepare_s = time.perf_counter() - t
    shutil.rmtree(workdir / "shards")  # the index is self-contained; free the disk first
    report = run_bench(BenchConfig(**{**vars(cfg), "index": index_dir, "synthetic": None}))
    report["shards_and_build_s"] = round(prepare_s, 1)
    report["faiss_mb"] = round(_disk(index_dir.glob("*.faiss")) / 2**20, 1)
    report["store_mb"] = round(_disk((index_dir / "store.lmdb").glob("*")) / 2**20, 1)
    return report


def _disk(paths) -> int:
    """Bytes actually allocated (LMDB's file may be sparse beyond its used pages)."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def growth_exponents(rows: list[dict]) -> dict:
    """Per score, b of p50 ∝ N^b fitted by least squares on log p50 against log N."""
    out = {}
    for score in rows[0]["scores"]:
        pts = [(r["n"], r["scores"][score]["p50_ms"]) for r in rows if score in r["scores"]]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[score] = round(float(np.polyfit(x, y, 1)[0]), 3)
    return out


def plot_scale(rows: list[dict], path: Path) -> Path:
    """p50 latency against N, both log scale, one line per score (Pillow)."""
    from PIL import Image, ImageDraw
    from benchmarks.plot import COLOURS
    from core.charts import save_png
    w, h, pad = 760, 500, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    scores = list(rows[0]["scores"])
    ns = [r["n"] for r in rows]
    ms = [r["scores"][s]["p50_ms"] for r in rows for s in scores]
    x_lo, x_hi = math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1
    y_lo, y_hi = math.log10(min(ms)) - 0.1, math.log10(max(ms)) + 0.1

    def xy(n, v):
        return (pad + (math.log10(n) - x_lo) / (x_hi - x_lo) * (w - 2 * pad),
                h - pad - (math.log10(v) - y_lo) / (y_hi - y_lo) * (h - 2 * pad))

    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    for n in ns:
        x, _ = xy(n, 10 ** y_lo)
        draw.text((x - 14, h - pad + 8), f"{n:.0e}", fill="black")
    for e in range(math.floor(y_lo), math.ceil(y_hi) + 1):   # 1-2-5 ticks inside the range
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if y_lo <= math.log10(v) <= y_hi:
                _, y = xy(10 ** x_lo, v)
                draw.line([pad - 4, y, pad, y], fill="black")
                draw.text((8, y - 6), f"{v:g} ms", fill="black")
    draw.text((w // 2 - 40, h - 25), "N (log)", fill="black")
    draw.text((8, 20), f"p50 latency vs N, D={rows[0]['dim']} (guaranteed shortlists)", fill="black")
    ends = [xy(rows[-1]["n"], rows[-1]["scores"][s]["p50_ms"])[1] for s in scores]
    for i, (s, label_y) in enumerate(zip(scores, _spread(ends, 12))):
        colour = COLOURS[i % len(COLOURS)]
        pts = [xy(r["n"], r["scores"][s]["p50_ms"]) for r in rows]
        draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((pts[-1][0] + 8, label_y - 6), s, fill=colour)
    return save_png(img, path)


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label positions at `ys` (same order), each pushed down just enough to keep `gap` from
    the one above it."""
    out, last = list(ys), -math.inf
    for i in sorted(range(len(ys)), key=lambda i: ys[i]):
        out[i] = max(ys[i], last + gap)
        last = out[i]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Cost curves of build and search over N.")
    p.add_argument("--sizes", default="100000,1000000,10000000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--scores", default=",".join(ALL_SCORES))
    p.add_argument("--workdir", default="scale_work")
    p.add_argument("--out", default="scale.json")
    p.add_argument("--plot", default="scale.png")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: measure one size
    args = p.parse_args(argv)
    configure_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scores = tuple(s for s in args.scores.split(",") if s)
    work = Path(args.workdir)
    if args.one:
        report = measure_one(args.one, args.dim, work / f"n{args.one}", args.queries, scores)
        shutil.rmtree(work / f"n{args.one}", ignore_errors=True)
        print(json.dumps(report))
        return 0
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.scale", "--one", str(n), "--dim", str(args.dim),
               "--queries", str(args.queries), "--scores", args.scores, "--workdir", str(work)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"scale: N={n} failed (exit {done.returncode}); stopping", file=sys.stderr)
            break
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        Path(args.out).write_text(json.dumps({"sizes": rows}, indent=2))  # resumable record
    if not rows:
        return 1
    result = {"sizes": rows, "p50_growth_exponent": growth_exponents(rows)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    if len(rows) >= 2:
        plot_scale(rows, Path(args.plot))
    print(json.dumps(_table(result), indent=2))
    return 0


def _table(result: dict) -> dict:
    """The compact view: per size build, sizes, RSS and per score p50/p99/recall."""
    return {"p50_growth_exponent": result["p50_growth_exponent"], "sizes": [
        {"n": r["n"], "factory": r["factory"], "build_s": r["build_s"], "faiss_mb": r["faiss_mb"],
         "store_mb": r["store_mb"], "peak_rss_mb": r["peak_rss_mb"],
         "scores": {s: [v["p50_ms"], v["p99_ms"], v["recall@10"], v["shortlist_p50"]]
                    for s, v in r["scores"].items()}} for r in result["sizes"]]}


if __name__ == "__main__":
    sys.exit(main())
