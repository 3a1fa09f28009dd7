"""Checkpoint-driven pipelines behind `cli.py encode` and `cli.py eval`."""
from __future__ import annotations

import logging
from pathlib import Path

from core.atomic import sha256_file

from encoders.model.checkpoint import load_model, resolve_device
from encoders.model.open_vocab import OpenVocab
from encoders.training.data import load_split
from encoders.training.evaluate import encode_split, evaluate_split, query_captions
from encoders.training.export import export_shards

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


# Protocols that average a metric over several splits: COCO 1K is the mean over the five 1,000-image
# folds of the 5K test split.
AVERAGED_SPLITS = {("coco", "test1k"): [f"test1k-{k}" for k in range(5)]}


def mean_reports(reports: list):
    """Element-wise mean of reports of the same shape: numbers are averaged, dicts and lists
    recursively, anything else (names) is taken from the first report."""
    first = reports[0]
    if isinstance(first, dict):
        return {k: mean_reports([r[k] for r in reports]) for k in first}
    if isinstance(first, list):
        return [mean_reports(list(items)) for items in zip(*reports)]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(reports) / len(reports)
    return first


def evaluate_checkpoint(checkpoint: str, data: str, root: str, split: str, scores,
                        device: str = "auto", open_vocab: bool = False) -> dict:
    """The eval report of `split`; for an averaged protocol (coco test1k), the mean of the
    reports of its splits, with "folds" naming them. `open_vocab`: captions read as `query`
    reads them (words unseen in training through GloVe), not with unseen words as <unk>."""
    dev = resolve_device(device)
    model, vocab, _ = load_model(checkpoint, dev)
    if open_vocab:
        vocab = OpenVocab.for_model(model, vocab)
    sha = {"checkpoint_sha256": sha256_file(checkpoint)}
    folds = AVERAGED_SPLITS.get((data, split))

    def one(name: str) -> dict:
        sp = load_split(data, Path(root), name)
        return evaluate_split(model, vocab, sp, dev, scores=scores,
                              queries=query_captions(model, vocab, sp, dev))

    if folds is None:
        return {**one(split), **sha, "vocabulary": "open" if open_vocab else "closed"}
    reports = [one(f) for f in folds]
    return {**mean_reports(reports), "split": split, "folds": folds, **sha,
            "vocabulary": "open" if open_vocab else "closed"}
