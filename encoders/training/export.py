"""Writing a split's embeddings as μ/log_var parquet shards (the indexer's input).

Images get ids 0..n_images-1 in split order and are their own group; captions get ids
0..n_captions-1 and the group of the image they were written for.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from indexer.shards import ShardWriter

from encoders.training.data.base import Split

logger = logging.getLogger(__name__)


def export_shards(out_dir: str | Path, split: Split, embeddings, producer: dict,
                  rows_per_shard: int = 100_000) -> Path:
    i_mu, i_lv, t_mu, t_lv = embeddings
    image_items = [str((split.root / p).resolve()) for p in split.image_paths]
    producer = {**producer, "dataset": split.dataset, "split": split.name}
    with ShardWriter(Path(out_dir), i_mu.shape[1], producer, rows_per_shard) as writer:
        writer.add("image", i_mu, i_lv, image_items, np.arange(split.n_images, dtype=np.int64))
        writer.add("text", t_mu, t_lv, list(split.captions), split.caption_image.astype(np.int64))
    logger.info("wrote %d image and %d caption rows to %s", split.n_images, split.n_captions, out_dir)
    return Path(out_dir)
