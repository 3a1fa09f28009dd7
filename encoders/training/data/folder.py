"""Your own images and captions: a folder anyone can put together.

Layout:
    root/images/...        the images (any sub-folders)
    root/captions.jsonl    one JSON object per line: {"image": "cat.jpg", "caption": "a cat"}
                           or {"image": ..., "captions": [...]}; optional "split" field
 or root/captions.csv      header image,caption (optional split column)
An image path is looked up under root/images/ first, then under root/ (so both "cat.jpg" and
"images/cat.jpg" work). Several lines may name the same image; images keep the order in which
they first appear, and "the first n images" means that order.

Splits: "all" is everything. "train" / "val" / "test" use an image's "split" field when its
first line has one, else a deterministic hash of its path: sha1 mod 100 below 80 -> train,
below 90 -> val, else test (80/10/10, stable as images are added or removed).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

from core.errors import PcmeError

from encoders.training.data.base import Split
from encoders.training.data.files import cap_images, check_images_exist, require_dir

logger = logging.getLogger(__name__)

SPLITS = ("all", "train", "val", "test")
TRAIN_PERCENT, VAL_PERCENT = 80, 10  # the rest is test


def hash_split(image: str) -> str:
    bucket = int(hashlib.sha1(image.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < TRAIN_PERCENT:
        return "train"
    return "val" if bucket < TRAIN_PERCENT + VAL_PERCENT else "test"


def _record(obj, path: Path, lineno: int) -> tuple[str, list[str], str | None]:
    """(image, captions, split or None) from one parsed line."""
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
        raise PcmeError(f"{where}: expected an object with an \"image\" path")
    texts = obj["captions"] if "captions" in obj else [obj.get("caption")]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip()
                                                          for t in texts):
        raise PcmeError(f"{where}: expected a non-empty \"caption\" or \"captions\" list")
    split = obj.get("split")
    if split is not None and split not in SPLITS[1:]:
        raise PcmeError(f"{where}: split must be train, val or test, got {split!r}")
    return obj["image"], [t.strip() for t in texts], split


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PcmeError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
            yield _record(obj, path, lineno)


def _read_csv(path: Path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise PcmeError(f"{path}:1: header must have columns image,caption")
        try:
            for row in reader:
                if None in row or None in row.values():
                    raise PcmeError(f"{path}:{reader.line_num}: wrong number of fields")
                yield _record({k: v for k, v in row.items() if k != "split" or v},
                              path, reader.line_num)
        except csv.Error as e:
            raise PcmeError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e


def read_records(root: Path) -> tuple[Path, dict[str, tuple[list[str], str | None]]]:
    """(the captions file, {image: (captions, split)}) in order of first appearance."""
    for name, reader in (("captions.jsonl", _read_jsonl), ("captions.csv", _read_csv)):
        path = root / name
        if path.is_file():
            break
    else:
        raise PcmeError(f"{root}: no captions.jsonl or captions.csv")
    images: dict[str, tuple[list[str], str | None]] = {}
    try:
        for image, texts, split in reader(path):
            images.setdefault(image, ([], split))[0].extend(texts)
    except (OSError, UnicodeDecodeError) as e:
        raise PcmeError(f"{path}: cannot read ({e})") from e
    if not images:
        raise PcmeError(f"{path}: no captions")
    return path, images


def _resolve(root: Path, image: str) -> str:
    """Path relative to root: images/<image> when that exists, else <image> itself."""
    return f"images/{image}" if (root / "images" / image).is_file() else image


def load_folder(root: Path, split: str, n_images: int | None = None) -> Split:
    """Split `split` of a captioned image folder, capped at its first `n_images` images."""
    if split not in SPLITS:
        raise PcmeError(f"folder: unknown split {split!r}; known: {', '.join(SPLITS)}")
    require_dir(root / "images", "images")
    path, records = read_records(root)
    chosen = [img for img, (_, s) in records.items()
              if split == "all" or (s or hash_split(img)) == split]
    if not chosen:
        raise PcmeError(f"{path}: no images in split {split!r}")
    chosen = chosen[:cap_images(len(chosen), n_images, "folder")]
    fields = {"image_paths": [_resolve(root, img) for img in chosen],
              "image_keys": [f"folder/{img}" for img in chosen], "captions": [],
              "caption_image": []}
    for i, img in enumerate(chosen):
        fields["captions"] += records[img][0]
        fields["caption_image"] += [i] * len(records[img][0])
    check_images_exist(root, fields["image_paths"], path)
    logger.info("folder/%s: %d images, %d captions", split, len(chosen), len(fields["captions"]))
    return Split(dataset="folder", name=split, root=root, **fields)
