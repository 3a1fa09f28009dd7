"""How fast the scenes world is generated on one core (the target is >= 500 images/s).

Times scene sampling + rendering + captions (what the cache build does per image, minus the
PNG write), then the PNG encode and the read-back of a cached split separately, and prints
medians over a few runs. Not a test: speed depends on the machine.

    python benchmarks/scenes_gen.py [--n 2000] [--runs 5]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

from encoders.training.data import load_split
from encoders.training.data.scenes_cache import SPLIT_SEEDS, generate_item


def _rate(fn, n: int, runs: int) -> float:
    """Median items per second of fn(i) for i in range(n), over `runs` runs."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images per run")
    ap.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    args = ap.parse_args(argv)
    seed = SPLIT_SEEDS["train"]

    gen = _rate(lambda i: generate_item(seed, i), args.n, args.runs)
    print(f"generate (sample + render + captions): {gen:8.0f} images/s  (target >= 500)")

    images = [generate_item(seed, i)[1] for i in range(min(args.n, 500))]
    png = _rate(lambda i: images[i].save(io.BytesIO(), format="PNG"), len(images), args.runs)
    print(f"png encode (in memory):                {png:8.0f} images/s")

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        load_split("scenes", Path(root), "train", n_images=args.n)
        build = args.n / (time.perf_counter() - start)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            split = load_split("scenes", Path(root), "train", n_images=args.n)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        split.match_matrix()
        mm = time.perf_counter() - start
    print(f"cache build (generate + write):        {build:8.0f} images/s")
    print(f"cache read-back of {args.n} images:     {statistics.median(times) * 1e3:8.1f} ms")
    print(f"match matrix {split.n_captions} x {split.n_images}:      {mm * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
