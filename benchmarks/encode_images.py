"""Throughput of `encode --images`: images/s for a checkpoint on a folder, decode included.

    python benchmarks/encode_images.py --checkpoint runs/photos/checkpoint.pt --images DIR [--repeats 3]
        [--compare-unfused]

Each repeat is the whole pipeline (list, decode with the shared loader, encode, write shards);
the median over repeats is reported with the machine's load average, since a shared CPU's
throughput moves with it, and with the process's CPU time per image (user + system, all
threads), which moves much less with other people's work: on an idle machine with `cpus` cores
the rate can approach cpus * 1000 / cpu_ms_per_image. `--compare-unfused` alternates each
repeat with one of the trained (unfolded, encoders/model/inference.py) image tower.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from core.process import configure_process


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare-unfused", action="store_true")
    args = ap.parse_args(argv)
    configure_process("encode")   # as `cli.py encode` runs (core/process.py)
    modes = (True, False) if args.compare_unfused else (True,)
    runs = {fuse: {"rates": [], "cpu_ms": []} for fuse in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for fuse in modes:  # interleaved, so both see the same load
                done = _one(args, Path(tmp) / f"out{r}-{fuse}", fuse, runs[fuse])
    report = {"images": done["images"], "skipped": done["skipped"],
              **_summary(runs[True]), "load_average_1min": os.getloadavg()[0],
              "cpus": os.cpu_count()}
    if args.compare_unfused:
        report["unfused"] = _summary(runs[False])
        report["speedup"] = round(report["median_images_per_s"]
                                  / report["unfused"]["median_images_per_s"], 2)
    print(json.dumps(report))
    return 0


def _one(args, out: Path, fuse: bool, into: dict) -> dict:
    from encoders.training.encode_files import encode_files_to_shards

    t, c = time.perf_counter(), _cpu_s()
    done = encode_files_to_shards(args.checkpoint, str(out), images=args.images,
                                  device=args.device, fuse=fuse)
    into["rates"].append(done["images"] / (time.perf_counter() - t))
    into["cpu_ms"].append(1000 * (_cpu_s() - c) / done["images"])
    return done


def _summary(run: dict) -> dict:
    return {"images_per_s": [round(x, 1) for x in run["rates"]],
            "median_images_per_s": round(statistics.median(run["rates"]), 1),
            "median_cpu_ms_per_image": round(statistics.median(run["cpu_ms"]), 1)}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
