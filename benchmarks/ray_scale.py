"""Scale-out on Ray, measured on this machine: the issue-12 table.

  1. encode throughput (rows/s) of `encode --ray` with a pool of 1 and of 2 workers, on the
     scenes test split with a tiny model trained here first;
  2. an N × D synthetic index built in one process (build_index) and through Ray in parts
     (build_index_distributed): wall time, peak RSS of the driver (each build runs in its own
     child process, so its peak is its own) and of a Ray worker, and disk;
  3. query p50 of the sharded index (one Ray actor per shard, merged) against the single index.

    python -m benchmarks.ray_scale --n 1000000 --dim 128 [--workers 2] [--json out.json]

Everything is written under --workdir and deleted at the end unless --keep is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import finish_report
from core.errors import PcmeError
from core.process import configure_process

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.02   # how often a phase samples its own anonymous memory


def disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20, 1)


def child(phase: str, *args: str) -> dict:
    """Run one phase in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.ray_scale", "--phase", phase, *args],
                         env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class AnonPeak:
    """Peak anonymous resident memory (RssAnon) of this process, sampled in a thread. Unlike
    ru_maxrss it leaves out file pages mapped for reading (the memory-mapped parts, LMDB),
    which are page cache the kernel can drop, not memory the build holds."""

    def __init__(self):
        import threading
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 1)


def phase(name: str, args: list[str]) -> dict:
    from indexer.distributed import peak_rss_mb

    if name == "synthetic":
        from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
        n, dim, out = int(args[0]), int(args[1]), Path(args[2])
        write_synthetic_shards(SyntheticSpec(n_items=n, dim=dim), out)
        return {"disk_mb": disk_mb(out)}
    if name == "single":
        from indexer.build import build_index
        t, anon = time.perf_counter(), AnonPeak()
        m = build_index(Path(args[0]), Path(args[1]))
        return {"s": round(time.perf_counter() - t, 1), "driver_peak_mb": peak_rss_mb(),
                "driver_anon_peak_mb": anon.stop(),
                "disk_mb": disk_mb(Path(args[1])), "factory": m["factory"]["image"]}
    if name == "ray":
        from core.cluster import ray_cluster
        from indexer.distributed import build_index_distributed
        with ray_cluster(f"local:{args[3]}"):
            t, anon = time.perf_counter(), AnonPeak()
            m = build_index_distributed(Path(args[0]), Path(args[1]), part_rows=int(args[2]),
                                        sharded=len(args) > 4)
            s = round(time.perf_counter() - t, 1)
        facts = {"s": s, "driver_peak_mb": peak_rss_mb(), "driver_anon_peak_mb": anon.stop(),
                 "disk_mb": disk_mb(Path(args[1])),
                 "parts": len(m["build"]["ray"]["parts"]),
                 "worker_peak_mb": m["build"]["ray"]["worker_peak_rss_mb"]}
        return facts
    raise SystemExit(f"unknown phase {name}")


def encode_throughput(work: Path, workers: list[int], repeats: int = 3) -> dict:
    """rows/s of the encode job on a ready pool of 1 and of N actors (the default model
    config, trained for one step here: the cost per row is the real encoders')."""
    from core.cluster import ray_cluster
    from encoders.training.distributed import encode_distributed, encoder_actors

    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "cli.py", "train", "--root", str(work / "data"), "--out",
                    str(work / "run"), "--shards", str(work / "out"), "--train-images", "128",
                    "--epochs", "1", "--device", "cpu"], cwd=ROOT, check=True, capture_output=True)
    args = (str(work / "run" / "checkpoint.pt"), "scenes", str(work / "data"), "test")
    out = {}
    with ray_cluster(f"local:{max(workers)}") as ray:
        encode_distributed(*args, str(work / "warm"), "cpu", 512, workers=1)  # caches, imports
        make = encoder_actors(*args, "cpu")
        for w in workers:  # the pool is started first: the time is the encoding, not start-up
            pool = [make() for _ in range(w)]
            ray.get([a.ready.remote() for a in pool])
            times = []
            for r in range(repeats):
                t = time.perf_counter()
                encode_distributed(*args, str(work / f"enc{w}-{r}"), "cpu", 512, pool=pool)
                times.append(time.perf_counter() - t)
            for a in pool:
                ray.kill(a)
            manifest = json.loads((work / f"enc{w}-0" / "manifest.json").read_text())
            rows = sum(manifest["counts"].values())
            out[w] = {"median_s": round(statistics.median(times), 2),
                      "rows_per_s": round(rows / statistics.median(times), 1)}
    return out


def query_p50(single: Path, sharded: Path, workers: int, n_queries: int = 100) -> dict:
    """p50 of one query (elk, k = 10) on the single index and on the sharded one. Every query
    is run once on both first (page cache, lazy loads), then the two engines are timed in
    turn on each query, so a change in the machine's load hits both alike."""
    from core.cluster import ray_cluster
    from engine.search import SearchEngine
    from engine.sharded import ShardedEngine
    from indexer.shards import load_shards

    q = load_shards(single_shards(single), "text")
    mu, lv = q.mu[:n_queries], q.log_var[:n_queries]
    with ray_cluster(f"local:{workers}"), SearchEngine(single) as one, \
            ShardedEngine(sharded) as many:
        engines = {"single": one, "sharded": many}
        times = {name: [] for name in engines}
        for timed in (False, True):
            for i in range(n_queries):
                for name, engine in engines.items():
                    t = time.perf_counter()
                    engine.search("image", mu[i], lv[i], 10, "elk")
                    if timed:
                        times[name].append((time.perf_counter() - t) * 1000)
    out = {name: round(statistics.median(v), 2) for name, v in times.items()}
    out["ratio"] = round(out["sharded"] / out["single"], 2)
    out["image_shards"] = sum(s["modality"] == "image"
                              for s in json.loads((sharded / "manifest.json").read_text())["shards"])
    return out


def single_shards(index_dir: Path) -> Path:
    return Path(json.loads((index_dir / "manifest.json").read_text())["shards"]["dir"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--part-rows", type=int, default=262_144)
    ap.add_argument("--workdir", default="bench_work/ray_scale")
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--phase", default=None)
    a, rest = ap.parse_known_args()
    configure_process()  # as the CLI does: OpenMP threads wait passively (core/process.py)
    if a.phase:
        print(json.dumps(phase(a.phase, rest)))
        return
    from indexer.distributed import plan_parts
    try:
        plan_parts({}, a.part_rows)  # a bad --part-rows fails now, not after the single build
    except PcmeError as e:
        raise SystemExit(str(e))
    work = Path(a.workdir).absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {"n": a.n, "dim": a.dim, "workers": a.workers, "part_rows": a.part_rows,
              "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        if not a.skip_encode:
            report["encode"] = encode_throughput(work / "encode", [1, a.workers])
            report["encode"]["speedup"] = round(report["encode"][a.workers]["rows_per_s"]
                                                / report["encode"][1]["rows_per_s"], 2)
            print(json.dumps(report["encode"]), flush=True)
        shards = work / "shards"
        report["shards_disk_mb"] = child("synthetic", str(a.n), str(a.dim), str(shards))["disk_mb"]
        report["single"] = child("single", str(shards), str(work / "single"))
        print(json.dumps(report["single"]), flush=True)
        report["ray"] = child("ray", str(shards), str(work / "merged"), str(a.part_rows), str(a.workers))
        print(json.dumps(report["ray"]), flush=True)
        report["driver_peak_ratio"] = round(report["ray"]["driver_peak_mb"]
                                            / report["single"]["driver_peak_mb"], 2)
        report["driver_anon_peak_ratio"] = round(report["ray"]["driver_anon_peak_mb"]
                                                 / report["single"]["driver_anon_peak_mb"], 2)
        shutil.rmtree(work / "merged")
        child("ray", str(shards), str(work / "sharded"), str(a.part_rows), str(a.workers), "sharded")
        report["query_p50_ms"] = query_p50(work / "single", work / "sharded", a.workers)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    finish_report(report, a.json)


if __name__ == "__main__":
    main()
