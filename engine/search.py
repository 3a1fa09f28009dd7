"""The query engine: encode → approximate search on μ → fetch σ → probabilistic rescoring.

A text query searches the image index, an image query the caption index. The ANN stage only sees
μ, so it returns a shortlist larger than k; the chosen score (ELK by default) then ranks the
shortlist using both Gaussians, and the shortlist grows until no item outside it can enter the
top-k (engine/shortlist.py explains the bound). `exact=True` scores every item instead
(engine/exact.py); csd/w2 use the exact augmented-vector index when the build made one.
`uncertainty` is the mean of σ² over dimensions.
"""
from __future__ import annotations

import logging
import os
import time
import warnings

# torch and faiss each bring an OpenMP runtime; with the default (active) wait policy the idle
# threads of one spin on the cores the other needs, which turned 0.2 ms stages into 15 ms on a
# 2-core machine. Must be set before either library loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from indexer.reader import IndexReader

from .batch import BatchResult, BatchSearcher
from .errors import PcmeError

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000
MAX_IMAGE_PIXELS = 100_000_000


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    uncertainty: float
    item: str
    group: int


@dataclass
class QueryResult:
    query: str
    modality: str                  # modality of the results
    score: str
    query_uncertainty: float
    results: list[Hit]
    timings_ms: dict = field(default_factory=dict)
    unknown_words: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["results"] = [asdict(h) for h in self.results]
        return d


def uncertainty(log_var: np.ndarray) -> np.ndarray:
    return np.exp(log_var).mean(axis=-1)


class SearchEngine:
    def __init__(self, index_dir: str | Path, device: str = "cpu"):
        self.reader = IndexReader.open(Path(index_dir))
        self.device_name = device
        self._model = None
        self.batch = BatchSearcher(self.reader, *self._match_params())

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "SearchEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model named in the index manifest, loaded on first use --------------------------
    def model(self):
        if self._model is None:
            from encoders.checkpoint import load_model, resolve_device  # torch models: lazy

            producer = self.reader.manifest.get("producer", {})
            path = producer.get("checkpoint")
            if not path:
                raise PcmeError(f"{self.reader.index_dir}/manifest.json: names no checkpoint; "
                                "cannot encode queries")
            self.device = resolve_device(self.device_name)
            self._model = load_model(path, self.device, producer.get("checkpoint_sha256"))
        return self._model

    def encode_text(self, text: str):
        from encoders.encode import encode_query_text

        if len(text) > MAX_QUERY_CHARS:
            raise PcmeError(f"query: {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted")
        model, vocab, _ = self.model()
        return encode_query_text(model, vocab, text, self.device)

    def encode_image(self, path: str | Path):
        from encoders.encode import encode_images

        img = open_image(path)
        model, _, _ = self.model()
        mu, lv = encode_images(model, lambda i: img, 1, self.device)
        return mu[0], lv[0]

    # -- search ----------------------------------------------------------------------------------
    def search_batch(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                     score: str = "elk", exact: bool = False) -> BatchResult:
        """Top-k of Q queries at once (arrays [Q, D]); see engine/batch.py."""
        return self.batch.search(modality, mu_q, lv_q, k, score, exact)

    def search(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
               score: str = "elk", exact: bool = False) -> tuple[list[Hit], dict]:
        res = self.search_batch(modality, mu_q[None], lv_q[None], k, score, exact)
        ids = res.ids[0]
        t = time.perf_counter()
        lv_hits = self.reader.fetch_log_var(modality, ids)
        meta = self.reader.meta(modality, ids)
        timings = {name: round(v, 3) for name, v in res.timings_ms.items()}
        timings["meta_ms"] = _ms(t)
        timings["shortlist"] = int(res.shortlist[0])
        hits = [Hit(rank=r + 1, id=int(i), score=float(key), uncertainty=float(uncertainty(lv)),
                    item=item, group=int(group))
                for r, (i, key, lv, (group, item)) in enumerate(zip(ids, res.keys[0], lv_hits, meta))]
        return hits, timings

    def _load_timed(self) -> float:
        """Load the model (first query only) and say how long it took; not part of total_ms."""
        t = time.perf_counter()
        self.model()
        return _ms(t)

    def _match_params(self) -> tuple[float, float]:
        p = self.reader.manifest.get("producer", {})
        return float(p.get("match_a", 5.0)), float(p.get("match_b", 5.0))

    def query_text(self, text: str, k: int = 10, score: str = "elk",
                   exact: bool = False) -> QueryResult:
        load_ms = self._load_timed()
        t = time.perf_counter()
        mu, lv, unknown = self.encode_text(text)
        encode_ms = _ms(t)
        hits, timings = self.search("image", mu, lv, k, score, exact)
        timings = {"load_ms": load_ms, "encode_ms": encode_ms, **timings, "total_ms": _ms(t)}
        return QueryResult(text, "image", score, float(uncertainty(lv)), hits, timings, unknown)

    def query_image(self, path: str | Path, k: int = 10, score: str = "elk",
                    exact: bool = False) -> QueryResult:
        load_ms = self._load_timed()
        t = time.perf_counter()
        mu, lv = self.encode_image(path)
        encode_ms = _ms(t)
        hits, timings = self.search("text", mu, lv, k, score, exact)
        timings = {"load_ms": load_ms, "encode_ms": encode_ms, **timings, "total_ms": _ms(t)}
        return QueryResult(str(path), "text", score, float(uncertainty(lv)), hits, timings)


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"--image {path}: file not found")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x the limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except UnidentifiedImageError:
        raise PcmeError(f"--image {path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PcmeError(f"--image {path}: image larger than {MAX_IMAGE_PIXELS} pixels") from None
    except OSError as e:  # truncated or corrupt data
        raise PcmeError(f"--image {path}: cannot decode ({e})") from None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
