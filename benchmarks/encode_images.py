"""Throughput of `encode --images`: images/s for a checkpoint on a folder, decode included.

    python benchmarks/encode_images.py --checkpoint runs/photos/checkpoint.pt --images DIR [--repeats 3]

Each repeat is the whole pipeline (list, decode with the shared loader, encode, write shards);
the median over repeats is reported with the machine's load average, since a shared CPU's
throughput moves with it.
"""
from __future__ import annotations

import argparse
import json
import os
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
    args = ap.parse_args(argv)
    configure_process()
    from encoders.training.encode_files import encode_files_to_shards

    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            t = time.perf_counter()
            done = encode_files_to_shards(args.checkpoint, str(Path(tmp) / f"out{r}"),
                                          images=args.images, device=args.device)
            rates.append(done["images"] / (time.perf_counter() - t))
    print(json.dumps({"images": done["images"], "skipped": done["skipped"],
                      "images_per_s": [round(x, 1) for x in rates],
                      "median_images_per_s": round(statistics.median(rates), 1),
                      "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
