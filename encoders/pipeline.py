"""Checkpoint-driven pipelines behind `cli.py encode` and `cli.py eval`."""
from __future__ import annotations

import logging
from pathlib import Path

from indexer.manifest import sha256_file

from .checkpoint import load_model, resolve_device
from .data import load_split
from .evaluate import encode_split, evaluate_split
from .export import export_shards

logger = logging.getLogger(__name__)


def producer_of(checkpoint: str | Path, model) -> dict:
    """What the shard and index manifests record about the model that made the vectors."""
    path = Path(checkpoint).resolve()
    return {"checkpoint": str(path), "checkpoint_sha256": sha256_file(path),
            "match_a": model.a.item(), "match_b": model.b.item()}


def encode_to_shards(checkpoint: str, data: str, root: str, split: str, out: str,
                     device: str = "auto") -> Path:
    dev = resolve_device(device)
    model, vocab, _ = load_model(checkpoint, dev)
    sp = load_split(data, Path(root), split)
    emb = encode_split(model, vocab, sp, dev)
    return export_shards(out, sp, emb, producer_of(checkpoint, model))


def evaluate_checkpoint(checkpoint: str, data: str, root: str, split: str, scores,
                        device: str = "auto") -> dict:
    dev = resolve_device(device)
    model, vocab, _ = load_model(checkpoint, dev)
    sp = load_split(data, Path(root), split)
    return evaluate_split(model, vocab, sp, dev, scores=scores)
