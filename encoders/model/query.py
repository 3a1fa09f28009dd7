"""The query encoder the search engine is handed: text or an image file in, a Gaussian out.

The engine (engine/search.py) never imports the encoders; `cli.py` (and the service) build a
QueryEncoder from the checkpoint an index manifest names and pass it in. Any object with the
same three members works, e.g. a remote encoder or a test double.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import PcmeError
from core.timing import elapsed_ms
from encoders.model.checkpoint import load_model, resolve_device
from encoders.model.encode import (check_query_text, encode_images, encode_query_text,
                                   encode_texts)
from encoders.model.images import ImageError, load_image
from encoders.model.inference import fuse_for_encoding
from encoders.model.open_vocab import OpenVocab
from encoders.model.text import tokenize

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000


class QueryEncoder:
    """encode_text(text) -> (μ [D], log_var [D], unknown words); encode_image(path) -> (μ, log_var);
    encode_texts(texts): many queries in one forward pass (the service's micro-batches);
    words(text) -> the normalised words it reads (optional for other encoders).
    Text goes through the open vocabulary: only words GloVe does not know are unknown."""

    def __init__(self, model, vocab, device: torch.device, path: str | Path | None = None,
                 expected_sha256: str | None = None):
        self.model, self.vocab, self.device = model, vocab, device
        self.path, self.expected_sha256 = path, expected_sha256  # to add the image tower later
        self.load_ms = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu",
                        expected_sha256: str | None = None) -> "QueryEncoder":
        t = time.perf_counter()
        dev = resolve_device(device)
        # text tower only: most queries are text; the image tower is built on the first image query
        model, vocab, _ = load_model(path, dev, expected_sha256, towers=("text",))
        encoder = cls(model, OpenVocab.for_model(model, vocab), dev, path, expected_sha256)
        encoder.load_ms = elapsed_ms(t)
        return encoder

    @classmethod
    def for_index(cls, manifest: dict, where: str | Path, device: str = "cpu") -> "QueryEncoder":
        """The encoder of the checkpoint an index manifest names (`where`: the index, for errors)."""
        producer = manifest.get("producer", {})
        path = producer.get("checkpoint")
        if not path:
            raise PcmeError(f"{where}/manifest.json: names no checkpoint; cannot encode queries")
        return cls.from_checkpoint(path, device, producer.get("checkpoint_sha256"))

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        _check_length(text)
        return encode_query_text(self.model, self.vocab, text, self.device)

    def encode_texts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, list[str]] | PcmeError]:
        """encode_text's answer per text, or the PcmeError that text alone would raise; the valid
        texts are encoded together."""
        checked = []
        for text in texts:
            try:
                _check_length(text)
                checked.append(check_query_text(self.vocab, text))
            except PcmeError as e:
                checked.append(e)
        valid = [t for t, c in zip(texts, checked) if not isinstance(c, PcmeError)]
        if not valid:
            return checked
        mu, lv = encode_texts(self.model, self.vocab, valid, self.device)
        out, j = [], 0
        for c in checked:
            if isinstance(c, PcmeError):
                out.append(c)
            else:
                out.append((mu[j], lv[j], c))
                j += 1
        return out

    def words(self, text: str) -> list[str]:
        """The words of `text` as the encoder reads them (normalised: case, accents, NFKC)."""
        return tokenize(text)

    def encode_image(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        img = open_image(path)
        if self.model.image is None:
            self.model, _, _ = load_model(self.path, self.device, self.expected_sha256)
            fuse_for_encoding(self.model)
        mu, lv = encode_images(self.model, lambda i: img, 1, self.device)
        return mu[0], lv[0]


def _check_length(text: str) -> None:
    if len(text) > MAX_QUERY_CHARS:
        raise PcmeError(f"query: {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted")


def open_image(path: str | Path) -> Image.Image:
    """A query image as RGB (see encoders/model/images.py); unreadable, foreign or oversized files
    are a one-line error naming the --image argument."""
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"--image {path}: file not found")
    try:
        return load_image(path)
    except ImageError as e:
        raise PcmeError(f"--image {e}") from None
