"""COCO through Karpathy's dataset_coco.json, with the category labels that PMRP needs.

Splits (images in file order, images at root/<filepath>/<filename>):
    train            "train" + "restval" entries (113,287 images), as in VSE++ and PCME
    val              5,000 images
    test             the 5K test images
    test1k-0..4      the 1K protocol: consecutive 1,000-image folds of the 5K test
Each image keeps its first 5 captions (a few COCO images have 6 or 7), so the 5K test has the
standard 25,000 captions and every image the same number of chances in image->text recall.

Plausible matches (PCME's PMRP): when root/annotations/instances_{train,val}2014.json exist,
each image gets a multi-hot vector over the 80 categories (1 where at least one instance of the
category is annotated); a caption inherits its image's vector, and a caption plausibly matches
every image within Hamming distance ζ of it. The evaluator uses
    split.multi_hot_images      float32 [n_images, 80] (None without the instances files)
    split.multi_hot_captions    float32 [n_captions, 80]
    split.plausible_matrix(ζ)   bool [n_captions, n_images]
match_matrix() stays None: true matches are the pairing only. The instances files are large
(train: ~450 MB), so they are read on first use, and only those the split's images need.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PcmeError

from encoders.training.data.base import Split
from encoders.training.data.files import cap_images, check_images_exist, read_json
from encoders.training.data.karpathy import flat_fields, read_entries, select

logger = logging.getLogger(__name__)

COCO_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
FOLD_SIZE = 1_000            # the 1K protocol's fold size
CAPTIONS_PER_IMAGE = 5       # the standard protocol: 5K test images <-> 25K captions
SPLIT_FILES = ("dataset_coco.json", "annotations/dataset_coco.json")  # first found wins
_FOLD = re.compile(r"test1k-([0-4])")


@dataclass(eq=False)
class CocoSplit(Split):
    coco_ids: list[int] = field(default_factory=list)      # per image: COCO image id
    image_folders: list[str] = field(default_factory=list)  # per image: train2014 | val2014
    _multi_hot: object = field(default=None, init=False, repr=False)
    _multi_hot_read: bool = field(default=False, init=False, repr=False)

    @property
    def multi_hot_images(self) -> np.ndarray | None:
        """float32 [n_images, n_categories] 0/1; None when the instances files are absent."""
        if not self._multi_hot_read:
            self._multi_hot = read_multi_hot(self.root / "annotations", self.coco_ids,
                                             self.image_folders)
            self._multi_hot_read = True
        return self._multi_hot

    @property
    def multi_hot_captions(self) -> np.ndarray | None:
        images = self.multi_hot_images
        return None if images is None else images[self.caption_image]

    def plausible_matrix(self, zeta: int) -> np.ndarray:
        """bool [n_captions, n_images]: Hamming(caption's labels, image's labels) ≤ ζ."""
        images = self.multi_hot_images
        if images is None:
            raise PcmeError(f"{self.root / 'annotations'}: no instances_*.json, so no "
                            f"plausible matches for coco/{self.name}")
        return hamming(images[self.caption_image], images) <= zeta


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n_a, n_b] Hamming distances between 0/1 rows, by matmul (exact: counts are small)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    both = a @ b.T
    return np.rint(a.sum(1)[:, None] + b.sum(1)[None, :] - 2.0 * both).astype(np.int64)


def read_multi_hot(folder: Path, coco_ids: list[int], image_folders: list[str]
                   ) -> np.ndarray | None:
    paths = {name: folder / f"instances_{name}.json" for name in sorted(set(image_folders))}
    if not all(p.is_file() for p in paths.values()):
        logger.info("%s: no instances_*.json for %s; PMRP unavailable", folder, sorted(paths))
        return None
    labels, columns = {}, None
    for name, path in paths.items():
        file_columns, file_labels = _read_instances(path)
        if columns is not None and file_columns != columns:
            raise PcmeError(f"{path}: its categories differ from the other instances file")
        columns = file_columns
        labels.update({(name, i): v for i, v in file_labels.items()})
    out = np.zeros((len(coco_ids), len(columns)), dtype=np.float32)
    for row, key in enumerate(zip(image_folders, coco_ids)):
        if key not in labels:
            raise PcmeError(f"{paths[key[0]]}: no image with id {key[1]}")
        out[row, [columns[c] for c in labels[key]]] = 1.0
    return out


def _read_instances(path: Path) -> tuple[dict[int, int], dict[int, set[int]]]:
    """({category id: column}, {image id: category ids present}) from an instances file."""
    logger.info("reading %s", path)
    data = read_json(path)
    try:
        columns = {c["id"]: j for j, c in enumerate(sorted(data["categories"],
                                                            key=lambda c: c["id"]))}
        labels = {img["id"]: set() for img in data["images"]}
        for ann in data["annotations"]:
            labels[ann["image_id"]].add(ann["category_id"])
    except (KeyError, TypeError) as e:
        raise PcmeError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from e
    unknown = {c for cats in labels.values() for c in cats} - columns.keys()
    if unknown:
        raise PcmeError(f"{path}: annotations use unknown category ids {sorted(unknown)[:5]}")
    return columns, labels


def _split_file(root: Path) -> Path:
    for rel in SPLIT_FILES:
        if (root / rel).is_file():
            return root / rel
    raise PcmeError(f"{root / SPLIT_FILES[0]}: file not found (Karpathy's COCO split file)")


def _check_split(split: str) -> None:
    if split not in COCO_SPLITS and not _FOLD.fullmatch(split):
        raise PcmeError(f"coco: unknown split {split!r}; known: {', '.join(COCO_SPLITS)}, "
                        f"test1k-0 .. test1k-4")


def _entries(path: Path, split: str) -> list[dict]:
    fold = _FOLD.fullmatch(split)
    entries = select(read_entries(path), COCO_SPLITS["test" if fold else split], path)
    if not fold:
        return entries
    k = int(fold.group(1))
    if len(entries) < FOLD_SIZE * (k + 1):
        raise PcmeError(f"{path}: {len(entries)} test images, too few for fold {split}")
    return entries[FOLD_SIZE * k: FOLD_SIZE * (k + 1)]


def load_coco(root: Path, split: str, n_images: int | None = None) -> CocoSplit:
    """COCO split `split` (see the module docstring), capped at its first `n_images` images."""
    _check_split(split)
    path = _split_file(root)
    entries = _entries(path, split)
    entries = entries[:cap_images(len(entries), n_images, "coco")]
    try:
        ids = [int(e["cocoid"]) for e in entries]
        folders = [str(e["filepath"]) for e in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise PcmeError(f"{path}: an image of split {split} lacks \"cocoid\" or \"filepath\"") from e
    fields = flat_fields(entries, lambda e: f"{e['filepath']}/{e['filename']}",
                         lambda e: f"coco/{e['cocoid']}", path, CAPTIONS_PER_IMAGE)
    check_images_exist(root, fields["image_paths"], path)
    logger.info("coco/%s: %d images, %d captions", split, len(entries), len(fields["captions"]))
    return CocoSplit(dataset="coco", name=split, root=root, coco_ids=ids,
                     image_folders=folders, **fields)
