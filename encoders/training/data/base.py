"""The dataset interface every reader returns: one split of images and their captions.

A split is flat lists, so the rest of the code never needs to know which dataset it came from:
image i is `image_paths[i]` (relative to `root`), caption j is `captions[j]`, written for image
`caption_image[j]`. Datasets that know which captions are *true* of which images (the built-in
scenes, CUB) override `match_block`; real captioned datasets only know their pairing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import PcmeError
from encoders.model.images import load_image

logger = logging.getLogger(__name__)

_NOT_COMPUTED = object()  # sentinel: None is a valid cached match matrix ("unknown")


@dataclass(eq=False)  # identity equality: comparing arrays field by field is ambiguous
class Split:
    dataset: str                # dataset name, e.g. "scenes"
    name: str                   # "train" | "val" | "test"
    root: Path                  # folder the image paths are relative to
    image_paths: list[str]      # relative path per image; image index = position in this list
    image_keys: list[str]       # stable, human-readable key per image, e.g. "scenes/test/000123"
    captions: list[str]         # all captions of the split, flat
    caption_image: np.ndarray   # int64 [n_captions]: the image each caption was written for
    _match: object = field(default=_NOT_COMPUTED, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.image_paths) != len(self.image_keys):
            raise PcmeError(f"{self.dataset}/{self.name}: {len(self.image_paths)} image paths "
                            f"but {len(self.image_keys)} image keys")
        if self.caption_image.shape != (len(self.captions),):
            raise PcmeError(f"{self.dataset}/{self.name}: caption_image has shape "
                            f"{self.caption_image.shape}, expected ({len(self.captions)},)")
        if len(self.captions) and not (0 <= self.caption_image.min()
                                       and self.caption_image.max() < self.n_images):
            raise PcmeError(f"{self.dataset}/{self.name}: caption_image points outside "
                            f"0..{self.n_images - 1}")

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def load_image(self, i: int) -> Image.Image:
        """Image i as RGB. Decoded on demand: a split never holds its pixels in memory."""
        return load_image(self.root / self.image_paths[i])

    def pairing_matrix(self) -> np.ndarray:
        """bool [n_captions, n_images]: True only where a caption was written for that image."""
        m = np.zeros((self.n_captions, self.n_images), dtype=bool)
        m[np.arange(self.n_captions), self.caption_image] = True
        return m

    def match_matrix(self) -> np.ndarray | None:
        """bool [n_captions, n_images]: True wherever the caption is true of the image (a caption
        usually matches many images, not only its own). None if the dataset cannot know this.
        Computed once, then cached."""
        if self._match is _NOT_COMPUTED:
            self._match = self.match_block(np.arange(self.n_captions), np.arange(self.n_images))
        return self._match

    def match_block(self, captions: np.ndarray, images: np.ndarray) -> np.ndarray | None:
        """bool [len(captions), len(images)]: which of these captions are true of which of these
        images (a training batch, or the whole split for `match_matrix`). None if the dataset
        cannot know it: the default, which knows only the pairing. Datasets with exact ground
        truth override this one method."""
        return None
