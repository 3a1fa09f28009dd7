"""Karpathy split files (dataset_coco.json, dataset_flickr30k.json): the standard train/val/test
partition of COCO and Flickr30k used by VSE++, PCME and most retrieval papers.

A split file is {"images": [{"filename", "split", "sentences": [{"raw", "tokens"}, ...], ...}]};
COCO entries also carry "filepath" (train2014 | val2014) and "cocoid". Images keep the order of
the file, so "the first n images" and the 1K folds are the ones every paper uses.

Flickr30k: root/dataset_flickr30k.json, images in root/flickr30k-images/ or root/images/;
splits train | val | test (1,000 test images, 5 captions each).
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.errors import PcmeError

from encoders.training.data.base import Split
from encoders.training.data.files import cap_images, check_images_exist, read_json

logger = logging.getLogger(__name__)

FLICKR_SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",)}
FLICKR_IMAGE_DIRS = ("flickr30k-images", "images")  # both layouts are common; first found wins


def read_entries(path: Path) -> list[dict]:
    """The "images" list of a Karpathy split file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PcmeError(f"{path}: not a Karpathy split file (no top-level \"images\" list)")
    return data["images"]


def select(entries: list[dict], wanted: tuple[str, ...], path: Path) -> list[dict]:
    """Entries whose "split" is one of `wanted`, in file order."""
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "split" not in entry:
            raise PcmeError(f"{path}: images[{i}] has no \"split\" field")
        if entry["split"] in wanted:
            out.append(entry)
    if not out:
        raise PcmeError(f"{path}: no images with split {' or '.join(wanted)}")
    return out


def _caption(sentence, path: Path, where: str) -> str:
    """The raw sentence; files that only keep tokens get them joined by spaces."""
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"].strip()
    if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        return " ".join(str(t) for t in sentence["tokens"])
    raise PcmeError(f"{path}: {where} has a sentence without \"raw\" or \"tokens\"")


def captions_of(entry: dict, path: Path, max_captions: int | None) -> list[str]:
    where = f"image {entry.get('filename', '?')!r}"
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise PcmeError(f"{path}: {where} has no \"sentences\"")
    return [_caption(s, path, where) for s in sentences[:max_captions]]


def flat_fields(entries: list[dict], rel_path, key, path: Path,
                max_captions: int | None = None) -> dict:
    """The Split constructor's list fields from entries; rel_path/key: entry -> str."""
    fields = {"image_paths": [], "image_keys": [], "captions": [], "caption_image": []}
    for i, entry in enumerate(entries):
        if not isinstance(entry.get("filename"), str):
            raise PcmeError(f"{path}: an image of the split has no \"filename\"")
        fields["image_paths"].append(rel_path(entry))
        fields["image_keys"].append(key(entry))
        texts = captions_of(entry, path, max_captions)
        fields["captions"] += texts
        fields["caption_image"] += [i] * len(texts)
    return fields


def _flickr_image_dir(root: Path) -> str:
    for name in FLICKR_IMAGE_DIRS:
        if (root / name).is_dir():
            return name
    raise PcmeError(f"{root}: no Flickr30k image folder (looked for "
                    f"{' or '.join(FLICKR_IMAGE_DIRS)})")


def load_flickr30k(root: Path, split: str, n_images: int | None = None) -> Split:
    """Flickr30k's Karpathy split `split`, capped at its first `n_images` images."""
    if split not in FLICKR_SPLITS:
        raise PcmeError(f"flickr30k: unknown split {split!r}; known: {', '.join(FLICKR_SPLITS)}")
    path = root / "dataset_flickr30k.json"
    entries = select(read_entries(path), FLICKR_SPLITS[split], path)
    entries = entries[:cap_images(len(entries), n_images, "flickr30k")]
    folder = _flickr_image_dir(root)
    fields = flat_fields(entries, lambda e: f"{folder}/{e['filename']}",
                         lambda e: f"flickr30k/{Path(e['filename']).stem}", path)
    check_images_exist(root, fields["image_paths"], path)
    logger.info("flickr30k/%s: %d images, %d captions", split, len(entries),
                len(fields["captions"]))
    return Split(dataset="flickr30k", name=split, root=root, **fields)
