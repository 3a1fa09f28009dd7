"""The query engine: encode → approximate search on μ → fetch σ → probabilistic rescoring.

A text query searches the image index, an image query the caption index. The ANN stage only sees μ,
so it returns a shortlist several times larger than k; the chosen score (ELK by default) then ranks
the shortlist using both Gaussians. `uncertainty` is the mean of σ² over dimensions.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from indexer.reader import IndexReader

from .errors import PcmeError
from .scores import SCORES, match_prob, rank_key

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000
MAX_IMAGE_PIXELS = 100_000_000
MC_SAMPLES = 16
MC_SEED = 0
NOISE_ROWS = 4096  # items share a noise row when their ids agree modulo this


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


def shortlist_size(k: int, n: int) -> int:
    """ANN candidates to rescore: 10·k, at least 200, never more than the index holds."""
    return min(n, max(10 * k, 200))


@lru_cache(maxsize=4)
def _noise_table(n_samples: int, dim: int) -> torch.Tensor:
    """[NOISE_ROWS + 1, J, D] fixed standard-normal noise; row NOISE_ROWS is the query's."""
    gen = torch.Generator().manual_seed(MC_SEED)
    return torch.randn(NOISE_ROWS + 1, n_samples, dim, generator=gen)


def item_noise(ids: np.ndarray, n_samples: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item Monte-Carlo noise keyed by id: an item's samples, hence its `mc` score, do not
    depend on which other items share the shortlist. Returns (eps_q [J, 1, D], eps_d [J, M, D])."""
    table = _noise_table(n_samples, dim)
    rows = torch.from_numpy(np.asarray(ids, dtype=np.int64) % NOISE_ROWS)
    return table[NOISE_ROWS][:, None], table[rows].transpose(0, 1)


def rescore(score: str, mu_q, lv_q, mu_d, lv_d, a: float, b: float,
            ids: np.ndarray | None = None) -> np.ndarray:
    """Rank key (higher = better) of each of M candidates for one query; arrays [D] and [M, D].
    `ids` (the candidates' ids) key the fixed per-item noise of the `mc` score."""
    if score not in SCORES:
        raise PcmeError(f"--score {score}: choose one of {', '.join(SCORES)}")
    q_mu, q_lv = torch.from_numpy(mu_q)[None], torch.from_numpy(lv_q)[None]
    d_mu, d_lv = torch.from_numpy(mu_d), torch.from_numpy(lv_d)
    if score == "mu":
        raw = SCORES["mu"][0](q_mu, d_mu)
    elif score == "mc":
        ids = np.arange(len(mu_d)) if ids is None else ids
        eps_q, eps_d = item_noise(ids, MC_SAMPLES, mu_d.shape[1])
        raw = match_prob(q_mu, q_lv, d_mu, d_lv, a, b, MC_SAMPLES, eps_q=eps_q, eps_d=eps_d)
    else:
        raw = SCORES[score][0](q_mu, q_lv, d_mu, d_lv)
    return rank_key(score, raw).numpy()


class SearchEngine:
    def __init__(self, index_dir: str | Path, device: str = "cpu"):
        self.reader = IndexReader.open(Path(index_dir))
        self.device_name = device
        self._model = None

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
    def search(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
               score: str = "elk") -> tuple[list[Hit], dict]:
        n = self.reader.count(modality)
        if k < 1:
            raise PcmeError(f"--k {k}: must be at least 1")
        k = min(k, n)
        timings = {}
        t = time.perf_counter()
        ids, _ = self.reader.search(modality, mu_q[None].astype(np.float32), shortlist_size(k, n))
        ids = ids[0]
        timings["ann_ms"] = _ms(t)
        t = time.perf_counter()
        mu_d, lv_d = self.reader.fetch(modality, ids)
        timings["fetch_ms"] = _ms(t)
        t = time.perf_counter()
        a, b = self._match_params()
        key = rescore(score, mu_q.astype(np.float32), lv_q.astype(np.float32), mu_d, lv_d, a, b, ids)
        order = np.argsort(-key, kind="stable")[:k]
        timings["rescore_ms"] = _ms(t)
        meta = self.reader.meta(modality, ids[order])
        hits = [Hit(rank=r + 1, id=int(ids[i]), score=float(key[i]),
                    uncertainty=float(uncertainty(lv_d[i])), item=item, group=int(group))
                for r, (i, (group, item)) in enumerate(zip(order, meta))]
        return hits, timings

    def _load_timed(self) -> float:
        """Load the model (first query only) and say how long it took; not part of total_ms."""
        t = time.perf_counter()
        self.model()
        return _ms(t)

    def _match_params(self) -> tuple[float, float]:
        p = self.reader.manifest.get("producer", {})
        return float(p.get("match_a", 5.0)), float(p.get("match_b", 5.0))

    def query_text(self, text: str, k: int = 10, score: str = "elk") -> QueryResult:
        load_ms = self._load_timed()
        t = time.perf_counter()
        mu, lv, unknown = self.encode_text(text)
        encode_ms = _ms(t)
        hits, timings = self.search("image", mu, lv, k, score)
        timings = {"load_ms": load_ms, "encode_ms": encode_ms, **timings, "total_ms": _ms(t)}
        return QueryResult(text, "image", score, float(uncertainty(lv)), hits, timings, unknown)

    def query_image(self, path: str | Path, k: int = 10, score: str = "elk") -> QueryResult:
        load_ms = self._load_timed()
        t = time.perf_counter()
        mu, lv = self.encode_image(path)
        encode_ms = _ms(t)
        hits, timings = self.search("text", mu, lv, k, score)
        timings = {"load_ms": load_ms, "encode_ms": encode_ms, **timings, "total_ms": _ms(t)}
        return QueryResult(str(path), "text", score, float(uncertainty(lv)), hits, timings)


def open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise PcmeError(f"--image {path}: file not found")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise PcmeError(f"--image {path}: not an image file") from None
    except Image.DecompressionBombError:
        raise PcmeError(f"--image {path}: image larger than {MAX_IMAGE_PIXELS} pixels") from None
    except OSError as e:  # truncated or corrupt data
        raise PcmeError(f"--image {path}: cannot decode ({e})") from None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)
