"""Clustered synthetic μ/log σ² written as ordinary shards, for benchmarks and tests at scale.

Real embeddings are not uniform on the sphere: they form clusters (scenes, object categories),
and PCME's σ is larger for ambiguous items, i.e. those far from their cluster's core. The
generator mimics both:
  μ       = normalise(centre_c + r · noise),  r ~ U(0.5, 1.5) the item's ambiguity,
  log σ²  = base_d + spread · log(r) + 0.05 · noise_d,
so log σ² is correlated with the distance to the centre, and every dimension has its own
baseline. Images are the searchable items; captions drawn from the same clusters (another
random stream) serve as held-out queries, exactly like a text query searching images.

The rows go through `ShardWriter`, so the indexer sees the same files as for real data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PcmeError
from indexer.shards import ShardWriter

logger = logging.getLogger(__name__)

BATCH = 50_000  # rows generated and written per step: bounds memory at ~BATCH·D·16 bytes


@dataclass
class SyntheticSpec:
    n_items: int                 # searchable items (modality "image")
    dim: int
    n_queries: int = 1000        # held-out queries (modality "text")
    n_centres: int = 1000        # clusters on the sphere
    noise: float = 0.6           # expected ‖noise‖ relative to a unit centre, at r = 1
    lv_mean: float = -7.0        # mean log σ²; σ² ≪ typical ‖Δμ‖²/D, as for trained PCME heads
    lv_spread: float = 0.3       # how strongly log σ² follows the ambiguity r
    seed: int = 0


def _centres(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    c = rng.standard_normal((spec.n_centres, spec.dim), dtype=np.float32)
    base = spec.lv_mean + 0.2 * rng.standard_normal(spec.dim, dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True), base


def sample(spec: SyntheticSpec, n: int, rng: np.random.Generator,
           centres: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(μ [n, D] unit rows, log_var [n, D], cluster [n]) drawn from the spec's distribution."""
    cluster = rng.integers(0, len(centres), n)
    r = rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, spec.dim), dtype=np.float32) * (spec.noise / spec.dim ** 0.5)
    mu = centres[cluster] + r * noise
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    jitter = 0.05 * rng.standard_normal((n, spec.dim), dtype=np.float32)
    log_var = base + spec.lv_spread * np.log(r) + jitter
    return mu.astype(np.float32), log_var.astype(np.float32), cluster


def write_synthetic_shards(spec: SyntheticSpec, out_dir: Path) -> Path:
    """Write `spec.n_items` images and `spec.n_queries` captions as shards in `out_dir`."""
    if spec.n_items < 1 or spec.dim < 2 or spec.n_queries < 0:
        raise PcmeError(f"--synthetic {spec.n_items} --dim {spec.dim}: need N >= 1 and D >= 2")
    centres, base = _centres(spec)
    producer = {"synthetic": {k: v for k, v in vars(spec).items()}}
    streams = (("image", spec.n_items, spec.seed + 1), ("text", spec.n_queries, spec.seed + 2))
    with ShardWriter(Path(out_dir), spec.dim, producer, rows_per_shard=250_000) as w:
        for modality, n, seed in streams:
            rng = np.random.default_rng(seed)  # queries: a separate stream, so held out
            for start in range(0, n, BATCH):
                m = min(BATCH, n - start)
                mu, lv, cluster = sample(spec, m, rng, centres, base)
                # DESIGN.md: an image is its own group; a synthetic caption belongs to its cluster
                group = np.arange(start, start + m) if modality == "image" else cluster
                w.add(modality, mu, lv, [f"{modality}-{start + j}" for j in range(m)], group)
    logger.info("synthetic shards: %d items, %d queries, dim %d -> %s", spec.n_items,
                spec.n_queries, spec.dim, out_dir)
    return Path(out_dir)
