"""One-shot GPU check: AMP training throughput against the CPU, and faiss-gpu build and search
at 1M, printed as one JSON object.

    python benchmarks/gpu_check.py [--n 1000000] [--dim 256] [--train-images 1024] [--workdir gpu_work]

1. Training: the project's own Trainer (scenes data, the default model, one epoch over
   `--train-images` images) on the CPU, then on CUDA with AMP; images/s = images / fit time
   (data loading and model construction are not timed).
2. FAISS: synthetic shards of N × D are indexed twice by `build_index` (the GPU path: k-means on
   all GPUs, the μ index copied to the GPUs at load), once with the GPUs hidden from faiss; the
   same queries are searched on both, and the report gives build times, search p50 and QPS, and
   the overlap of the two top-10 lists (the GPU path must agree with the CPU one).
Without a GPU it stops at once with {"error": "no GPU ..."} and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np

from core.process import configure_process


def no_gpu_reason() -> str | None:
    import faiss
    import torch
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return ("no GPU: this faiss build sees no GPUs (install the gpu extra: "
                "pip install -e '.[gpu]', which replaces faiss-cpu)")
    return None


def training_throughput(images: int, workdir: Path) -> dict:
    from encoders.training.config import TrainConfig
    from encoders.training.train import Trainer
    out = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(epochs=1, train_images=images, device=device, amp=True, export=False,
                          out=str(workdir / f"run-{device}"), shards=str(workdir / "unused"))
        trainer = Trainer(cfg, False)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        trainer.fit(lambda row: None)
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        out[device] = {"fit_s": round(seconds, 2), "images_per_s": round(images / seconds, 1)}
    out["speedup"] = round(out["cuda"]["images_per_s"] / out["cpu"]["images_per_s"], 2)
    return out


def faiss_build_and_search(n: int, dim: int, workdir: Path, queries: int = 200) -> dict:
    from benchmarks.synthetic import SyntheticSpec, write_synthetic_shards
    from indexer import faiss_index as fx
    from indexer.build import build_index
    from indexer.reader import IndexReader
    shards = write_synthetic_shards(SyntheticSpec(n, dim, n_queries=queries), workdir / "shards")
    report = {"n": n, "dim": dim, "gpus": fx.gpu_count()}
    found = {}
    for path in ("gpu", "cpu"):
        hide = mock.patch.object(fx, "gpu_count", lambda: 0) if path == "cpu" else nullcontext()
        with hide:
            t = time.perf_counter()
            manifest = build_index(shards, workdir / f"index-{path}", nprobe=32)
            build_s = time.perf_counter() - t
            with IndexReader.open(workdir / f"index-{path}") as reader:
                _, mu_q, _ = reader.all_vectors("text")
                reader.search("image", mu_q[:10], 10)  # warm-up (GPU kernels, page cache)
                times = []
                ids = []
                for q in mu_q:
                    t = time.perf_counter()
                    ids.append(reader.search("image", q[None], 10)[0][0])
                    times.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                reader.search("image", mu_q, 10)
                batch_qps = len(mu_q) / (time.perf_counter() - t)
        found[path] = np.stack(ids)
        report[path] = {"build_s": round(build_s, 1), "factory": manifest["factory"]["image"],
                        "search_p50_ms": round(float(np.median(times)), 3),
                        "batch_qps": round(batch_qps, 1)}
    report["top10_overlap_gpu_vs_cpu"] = round(fx.recall_at_k(found["gpu"], found["cpu"]), 4)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--train-images", type=int, default=1024)
    p.add_argument("--workdir", default="gpu_work")
    args = p.parse_args(argv)
    configure_process()
    reason = no_gpu_reason()
    if reason:
        print(json.dumps({"error": reason}))
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = {"training": training_throughput(args.train_images, workdir),
                  "faiss": faiss_build_and_search(args.n, args.dim, workdir)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
