"""Datasets: every reader returns a `Split` (see base.py), so training and evaluation never
need to know which dataset they are looking at.

    from encoders.data import load_split
    split = load_split("scenes", Path("data"), "test")
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from encoders.data.base import Split
from engine.errors import PcmeError

logger = logging.getLogger(__name__)


def _scenes(root: Path, split: str, n_images: int | None) -> Split:
    from encoders.data.scenes_cache import load_scenes  # lazy: PIL drawing code not needed else

    return load_scenes(root, split, n_images)


# name -> loader(root, split, n_images). Add coco, flickr30k, cub and folder readers here; for
# them n_images may cap the split, for scenes it is the number of images generated.
LOADERS: dict[str, Callable[[Path, str, int | None], Split]] = {
    "scenes": _scenes,
}


def load_split(dataset: str, root: Path, split: str, n_images: int | None = None) -> Split:
    """One split of a dataset under `root` (scenes: generated there first if missing/stale)."""
    loader = LOADERS.get(dataset)
    if loader is None:
        raise PcmeError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(LOADERS))}")
    return loader(Path(root), split, n_images)


__all__ = ["Split", "load_split", "LOADERS"]
