"""Turning images and captions into (μ, log_var) with a trained model, in batches.

Used by training (evaluation at the end), by `encode`/export (shards) and by image queries
(encoders/model/query.py; text queries take the numpy tower of encoders/model/text_numpy.py).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.model.images import ImageError, load_image
from encoders.model.networks import PCME
from encoders.model.text import Vocab

logger = logging.getLogger(__name__)


def pad_tokens(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists with 0 (<pad>) -> (tokens [B, T], lengths [B])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return tokens, lengths


def image_to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image (grayscale, RGBA, any size) -> uint8 [3, size, size]."""
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Any PIL image -> float [3, size, size] in [0, 1], what the image encoder takes."""
    return image_to_uint8(img, size).float().div_(255.0)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def encode_texts(model: PCME, vocab: Vocab, texts: Sequence[str], device: torch.device,
                 batch_size: int = 512, progress=None, query: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`vocab`: the model's Vocab (closed: unseen words are <unk>) or an OpenVocab; `query`:
    encode the texts as queries (TextEncoder.forward), not as items of a collection."""
    model.eval()
    mus, lvs = [], []
    for sl in _batches(len(texts), batch_size):
        ids, extra, _ = vocab.encode_batch(list(texts[sl]))
        tokens, lengths = pad_tokens(ids)
        mu, lv = model.text(tokens.to(device), lengths,
                            None if extra is None else torch.from_numpy(extra).to(device),
                            query=query)
        mus.append(mu.float().cpu().numpy())
        lvs.append(lv.float().cpu().numpy())
        if progress:
            progress(sl.stop - sl.start)
    return np.concatenate(mus), np.concatenate(lvs)


@torch.no_grad()
def encode_images(model: PCME, load, n: int, device: torch.device, batch_size: int = 256,
                  progress=None) -> tuple[np.ndarray, np.ndarray]:
    """`load(i)` returns the i-th PIL image; images are encoded in batches of `batch_size`."""
    model.eval()
    size = model.cfg.image_size
    mus, lvs = [], []
    for sl in _batches(n, batch_size):
        batch = torch.stack([image_to_tensor(load(i), size) for i in range(sl.start, sl.stop)])
        mu, lv = model.image(batch.to(device))
        mus.append(mu.float().cpu().numpy())
        lvs.append(lv.float().cpu().numpy())
        if progress:
            progress(sl.stop - sl.start)
    return np.concatenate(mus), np.concatenate(lvs)


def _decode(path: Path, size: int) -> torch.Tensor | ImageError:
    try:
        return image_to_uint8(load_image(path, size_hint=size), size)
    except ImageError as e:
        return e


@torch.inference_mode()
def encode_image_files(model: PCME, paths: Sequence[Path], device: torch.device,
                       batch_size: int = 64, workers: int = 2):
    """Yield (paths encoded, μ, log_var, [(path, why) skipped]) per batch of files. Files that
    cannot be used are skipped, not fatal: one broken photo must not stop a folder of 10,000.
    The next batch is decoded by `workers` threads (PIL releases the GIL) while the model runs."""
    model.eval()
    size = model.cfg.image_size
    chunks = [list(paths[i: i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        submit = lambda chunk: [pool.submit(_decode, p, size) for p in chunk]  # noqa: E731
        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            decoded = [f.result() for f in pending]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            ok = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
            skipped = [(chunk[i], str(d)) for i, d in enumerate(decoded) if isinstance(d, ImageError)]
            if not ok:
                yield [], None, None, skipped
                continue
            x = torch.stack([decoded[i] for i in ok]).to(device).float().div_(255.0)
            mu, lv = model.image(x)
            yield [chunk[i] for i in ok], mu.float().cpu().numpy(), lv.float().cpu().numpy(), skipped
