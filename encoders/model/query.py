"""The query encoder the search engine is handed: text or an image file in, a Gaussian out.

The engine (engine/search.py) never imports the encoders; `cli.py` (and the service) build a
QueryEncoder from the checkpoint an index manifest names and pass it in. Any object with the
same members works, e.g. a remote encoder or a test double.

Text goes through the numpy copy of the text tower (encoders/model/text_numpy.py), read from
the checkpoint without torch: a one-shot text query never imports torch, whose import alone
took 1.7-4 s on a 2-core machine, several times the query. Image queries build the torch image
tower on the device asked for, on the first image query.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from core.errors import PcmeError
from core.timing import elapsed_ms
from encoders.model.checkpoint_reader import check_recorded_sha256
from encoders.model.images import ImageError, load_image
from encoders.model.open_vocab import OpenVocab
from encoders.model.text import check_query_text, tokenize
from encoders.model.text_numpy import NumpyTextTower

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000


class QueryEncoder:
    """encode_text(text) -> (μ [D], log_var [D], unknown words); encode_image(path) -> (μ, log_var);
    encode_texts(texts): many queries in one forward pass (the service's micro-batches);
    words(text) -> the normalised words it reads (optional for other encoders).
    Text goes through the open vocabulary: only words GloVe does not know are unknown."""

    def __init__(self, tower: NumpyTextTower, vocab, device: str = "cpu",
                 path: str | Path | None = None, expected_sha256: str | None = None):
        self.tower, self.vocab, self.device = tower, vocab, device
        self.path, self.expected_sha256 = path, expected_sha256  # to add the image tower later
        self.image_model = None
        self.load_ms = 0.0

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu",
                        expected_sha256: str | None = None) -> "QueryEncoder":
        t = time.perf_counter()
        if device != "cpu":   # checked now (cuda's presence needs torch), used by image queries
            from encoders.model.checkpoint import resolve_device
            resolve_device(device)
        check_recorded_sha256(path, expected_sha256)
        tower = NumpyTextTower.from_checkpoint(path)
        encoder = cls(tower, OpenVocab.for_words(tower.word_vectors, tower.vocab), device, path,
                      expected_sha256)
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
        got = self.encode_texts([text])[0]
        if isinstance(got, PcmeError):
            raise got
        return got

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
        ids, extra, _ = self.vocab.encode_batch(valid)
        mu, lv = self.tower.forward(ids, extra, query=True)
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
        from encoders.model.encode import encode_images

        model = self._image_tower()
        mu, lv = encode_images(model, lambda i: img, 1, next(model.parameters()).device)
        return mu[0], lv[0]

    def _image_tower(self):
        """The torch image tower on the encoder's device, built on the first image query."""
        if self.image_model is None:
            from encoders.model.checkpoint import load_model, resolve_device
            from encoders.model.inference import fuse_for_encoding

            model, _, _ = load_model(self.path, resolve_device(self.device),
                                     self.expected_sha256, towers=("image",))
            fuse_for_encoding(model)
            self.image_model = model
        return self.image_model


def _check_length(text: str) -> None:
    if len(text) > MAX_QUERY_CHARS:
        raise PcmeError(f"query: {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted")


def open_image(path: str | Path):
    """A query image as RGB (see encoders/model/images.py); unreadable, foreign or oversized files
    are a one-line error naming the --image argument."""
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"--image {path}: file not found")
    try:
        return load_image(path)
    except ImageError as e:
        raise PcmeError(f"--image {e}") from None
