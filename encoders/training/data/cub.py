"""CUB-200-2011 birds with Reed et al.'s captions (text_c10), in the zero-shot class split.

Layout:
    root/CUB_200_2011/images/<class_dir>/<name>.jpg     e.g. 001.Black_footed_Albatross/...
    root/text_c10/<class_dir>/<name>.txt                10 captions, one per line
    root/trainvalclasses.txt, root/testclasses.txt      optional: one class_dir per line
Splits: train = the 150 trainval classes, test = the 50 unseen classes, all = every class.
Without the class files the split is deterministic by class id (the number before the dot):
the first 150 classes train, the last 50 test. (Reed's files list a different, shuffled set of
classes; put them under root to reproduce published numbers.)

Images are those with a caption file, in class-dir then file-name order. Ground truth is the
class: a caption is a true match of every image of its bird species, so match_matrix() is
"same class" and `split.image_class` (int64 [n_images], the class id) is available.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import PcmeError

from encoders.training.data.base import Split
from encoders.training.data.files import cap_images, check_images_exist, require_dir

logger = logging.getLogger(__name__)

CLASS_FILES = {"train": "trainvalclasses.txt", "test": "testclasses.txt"}
N_TRAIN_CLASSES = 150        # fallback split: classes sorted by id, first 150 train, rest test
IMAGE_DIR = "CUB_200_2011/images"
TEXT_DIR = "text_c10"


@dataclass(eq=False)
class CubSplit(Split):
    image_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [n_images]

    def match_block(self, captions: np.ndarray, images: np.ndarray) -> np.ndarray:
        caption_class = self.image_class[self.caption_image[np.asarray(captions, dtype=np.int64)]]
        return caption_class[:, None] == self.image_class[np.asarray(images, dtype=np.int64)][None, :]


def class_id(class_dir: str) -> int:
    """"017.Cardinal" -> 17: the id the CUB file names start with."""
    head = class_dir.split(".", 1)[0]
    if not head.isdigit():
        raise PcmeError(f"cub: class folder {class_dir!r} does not start with a number")
    return int(head)


def _read_class_file(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise PcmeError(f"{path}: cannot read ({e})") from e
    return [n for n in names if n]


def split_classes(root: Path, split: str, all_classes: list[str]) -> list[str]:
    """The class dirs of `split`, sorted by class id."""
    if split == "all":
        chosen = list(all_classes)
    elif all((root / f).is_file() for f in CLASS_FILES.values()):
        chosen = _read_class_file(root / CLASS_FILES[split])
        unknown = sorted(set(chosen) - set(all_classes))
        if unknown:
            raise PcmeError(f"{root / CLASS_FILES[split]}: {len(unknown)} classes have no "
                            f"folder in {root / TEXT_DIR}, first {unknown[0]!r}")
    else:
        ordered = sorted(all_classes, key=class_id)
        chosen = ordered[:N_TRAIN_CLASSES] if split == "train" else ordered[N_TRAIN_CLASSES:]
    if not chosen:
        raise PcmeError(f"cub: split {split!r} has no classes under {root / TEXT_DIR}")
    return sorted(chosen, key=class_id)


def _read_captions(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PcmeError(f"{path}: cannot read ({e})") from e
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise PcmeError(f"{path}: no captions")
    return captions


def load_cub(root: Path, split: str, n_images: int | None = None) -> CubSplit:
    """CUB split `split` (train | test | all), capped at its first `n_images` images."""
    if split not in (*CLASS_FILES, "all"):
        raise PcmeError(f"cub: unknown split {split!r}; known: train, test, all")
    text_root = require_dir(root / TEXT_DIR, "CUB captions (text_c10)")
    require_dir(root / IMAGE_DIR, "CUB images")
    all_classes = sorted(p.name for p in text_root.iterdir() if p.is_dir())
    text_files = [t for c in split_classes(root, split, all_classes)
                  for t in sorted((text_root / c).glob("*.txt"))]
    text_files = text_files[:cap_images(len(text_files), n_images, "cub")]
    fields = {"image_paths": [], "image_keys": [], "captions": [], "caption_image": []}
    classes = []
    for i, path in enumerate(text_files):
        cls = path.parent.name
        fields["image_paths"].append(f"{IMAGE_DIR}/{cls}/{path.stem}.jpg")
        fields["image_keys"].append(f"cub/{cls}/{path.stem}")
        texts = _read_captions(path)
        fields["captions"] += texts
        fields["caption_image"] += [i] * len(texts)
        classes.append(class_id(cls))
    if not text_files:
        raise PcmeError(f"{text_root}: no caption files for split {split!r}")
    check_images_exist(root, fields["image_paths"], text_root)
    logger.info("cub/%s: %d classes, %d images, %d captions", split, len(set(classes)),
                len(text_files), len(fields["captions"]))
    return CubSplit(dataset="cub", name=split, root=root,
                    image_class=np.asarray(classes, dtype=np.int64), **fields)
