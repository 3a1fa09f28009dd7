"""`encode --images DIR` / `--captions FILE`: index what a user has, not only a dataset split.

Images: every image file under DIR (recursive; encoders.model.images.IMAGE_SUFFIXES), in sorted
path order, so ids are stable; files that cannot be decoded are skipped, counted and listed in
the shard manifest (producer.skipped). Items are absolute paths; each image is its own group.
Captions: a text file with one caption per line, or a .jsonl of {"caption": ...} objects; a
jsonl line may name {"image": "path relative to DIR"} and then takes that image's id as its
group (a text hit shows its photo, an image query finds its captions). Other captions have
group -1: no image of this shard set.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from core.errors import PcmeError
from core.progress import track
from indexer.shards import ShardWriter

from encoders.model.checkpoint import load_model, resolve_device
from encoders.model.encode import encode_image_files, encode_texts
from encoders.model.images import list_images
from encoders.model.inference import fuse_for_encoding
from encoders.model.open_vocab import OpenVocab
from encoders.training.pipeline import producer_of

logger = logging.getLogger(__name__)

NO_GROUP = -1
SKIPPED_LISTED = 1000  # the manifest lists at most this many skipped files (the count is exact)


def read_caption_file(path: str | Path) -> list[tuple[str, str | None]]:
    """[(caption, image or None)] from a .txt (one per line) or .jsonl file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"--captions {path}: file not found")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    out.append(_caption_line(line, path, lineno) if path.suffix == ".jsonl"
                               else (line.strip(), None))
    except UnicodeDecodeError as e:
        raise PcmeError(f"--captions {path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise PcmeError(f"--captions {path}: no captions")
    return out


def _caption_line(line: str, path: Path, lineno: int) -> tuple[str, str | None]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PcmeError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    text = obj.get("caption", obj.get("text")) if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise PcmeError(f"{path}:{lineno}: expected an object with a \"caption\" string")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise PcmeError(f"{path}:{lineno}: \"image\" must be a path string")
    return text.strip(), image


def encode_files_to_shards(checkpoint: str, out: str, images: str | None = None,
                           captions: str | None = None, device: str = "auto",
                           batch_size: int = 64, fuse: bool = True) -> dict:
    """Write the shards of a folder of images and/or a caption file; returns a summary.
    `fuse=False` keeps the trained image tower as it is (the benchmark's reference)."""
    if not images and not captions:
        raise PcmeError("encode: give --images DIR and/or --captions FILE (or --data)")
    paths = list_images(images) if images else []
    if images and not paths:
        raise PcmeError(f"--images {images}: no image files (jpg, png, webp, bmp, gif, tiff)")
    texts = read_caption_file(captions) if captions else []
    dev = resolve_device(device)
    model, vocab, _ = load_model(checkpoint, dev)
    if fuse:
        fuse_for_encoding(model)  # encode-only model: BatchNorm folded, ~1.5x less CPU per image
    producer = {**producer_of(checkpoint, model), "dataset": "files",
                "images": str(Path(images).resolve()) if images else None,
                "captions": str(Path(captions).resolve()) if captions else None}
    with ShardWriter(Path(out), model.cfg.out_dim, producer) as writer:
        image_ids, skipped = _write_images(writer, model, paths, dev, batch_size) if paths else ({}, [])
        if texts:
            _write_captions(writer, model, vocab, texts, image_ids, Path(images or "."), dev)
        writer.producer["skipped"] = {"count": len(skipped), "files": [
            {"path": str(p), "error": why} for p, why in skipped[:SKIPPED_LISTED]]}
    for p, why in skipped[:10]:
        logger.warning("skipped %s", why)
    return {"out": out, "images": len(image_ids), "captions": len(texts), "skipped": len(skipped)}


def _write_images(writer, model, paths, dev, batch_size):
    ids: dict[Path, int] = {}
    skipped = []
    with track("encode images", len(paths)) as bar:
        for done, mu, lv, bad in encode_image_files(model, paths, dev, batch_size):
            skipped += bad
            if done:
                first = writer.counts["image"]
                groups = np.arange(first, first + len(done), dtype=np.int64)  # own id
                writer.add("image", mu, lv, [str(p.resolve()) for p in done], groups)
                ids.update({p.resolve(): int(g) for p, g in zip(done, groups)})
            bar.advance(len(done) + len(bad))
    if not ids:
        raise PcmeError(f"--images: none of the {len(paths)} image files could be read "
                        f"(first: {skipped[0][1]})")
    return ids, skipped


def _write_captions(writer, model, vocab, texts, image_ids, images_root: Path, dev):
    groups = np.array([image_ids.get((images_root / img).resolve(), NO_GROUP) if img else NO_GROUP
                       for _, img in texts], dtype=np.int64)
    with track("encode captions", len(texts)) as bar:
        mu, lv = encode_texts(model, OpenVocab.for_model(model, vocab), [t for t, _ in texts], dev,
                              progress=bar.advance)
    writer.add("text", mu, lv, [t for t, _ in texts], groups)
