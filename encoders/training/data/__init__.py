"""Datasets: every reader returns a `Split` (see base.py), so training and evaluation never
need to know which dataset they are looking at.

    from encoders.training.data import load_split
    split = load_split("scenes", Path("data"), "test")
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from encoders.training.data.base import Split
from core.errors import PcmeError

logger = logging.getLogger(__name__)


def _scenes(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.training.data.scenes_cache import load_scenes  # lazy: PIL drawing code not needed else

    return load_scenes(root, split, n_images)


def _coco(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.training.data.coco import load_coco

    return load_coco(root, split, n_images)


def _flickr30k(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.training.data.karpathy import load_flickr30k

    return load_flickr30k(root, split, n_images)


def _cub(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.training.data.cub import load_cub

    return load_cub(root, split, n_images)


def _folder(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.training.data.folder import load_folder

    return load_folder(root, split, n_images)


# name -> loader(root, split, n_images). For scenes n_images is the number of images generated;
# for the real datasets it caps the split at its first n images (in the dataset's own order).
# Splits: scenes train|val|test; coco train|val|test|test1k-0..4; flickr30k train|val|test;
# cub train|test|all (zero-shot classes); folder all|train|val|test. See each reader's docstring.
LOADERS: dict[str, Callable[[Path, str, int | None], Split]] = {
    "scenes": _scenes,
    "coco": _coco,
    "flickr30k": _flickr30k,
    "cub": _cub,
    "folder": _folder,
}


def load_split(dataset: str, root: Path, split: str, n_images: int | None = None) -> Split:
    """One split of a dataset under `root` (scenes: generated there first if missing/stale)."""
    loader = LOADERS.get(dataset)
    if loader is None:
        raise PcmeError(f"unknown dataset {dataset!r}; known: {', '.join(LOADERS)}")
    return loader(Path(root), split, n_images)


__all__ = ["Split", "load_split", "LOADERS"]
