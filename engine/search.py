"""The query engine: encode → approximate search on μ → fetch σ → probabilistic rescoring.

A text query searches the image index, an image query the caption index. The ANN stage only sees
μ, so it returns a shortlist larger than k; the chosen score (ELK by default) then ranks the
shortlist using both Gaussians, and the shortlist grows until no item outside it can enter the
top-k (engine/shortlist.py explains the bound). `exact=True` scores every item instead
(engine/exact.py); csd/w2 use the exact augmented-vector index when the build made one.
`uncertainty` is the mean of σ² over dimensions.

Queries are encoded by the encoder object the engine is handed (encoders/model/query.py builds
one from the checkpoint the index manifest names); the engine itself imports no model code.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.served_mc import MC_SAMPLES, fixed_match_prob
from core.scores import DEFAULT_SCORE, score_name
from indexer.reader import IndexReader

from engine.batch import BatchResult, BatchSearcher
from engine.confidence import LOW_CONFIDENCE, Calibration
from core.errors import PcmeError
from core.timing import elapsed_ms

logger = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    id: int
    score: float                   # rank key of the score: higher is better (distances negated)
    p_match: float                 # match probability in [0, 1] under the learned a, b (mc)
    uncertainty: float             # the hit's Σσ²
    item: str
    group: int


@dataclass
class QueryResult:
    query: str
    modality: str                  # modality of the results
    score: str
    query_uncertainty: float       # the query's Σσ²
    results: list[Hit]
    confidence: float | None = None       # expected R@1 at the query's Σσ² (eval calibration)
    low_confidence: bool | None = None    # confidence below engine.confidence.LOW_CONFIDENCE
    timings_ms: dict = field(default_factory=dict)   # milliseconds only
    unknown_words: list[str] = field(default_factory=list)   # dropped: not in the vocabulary
    searched_words: list[str] | None = None   # the words that were searched (text queries)
    shortlist_size: int = 0                   # candidates rescored

    def to_json(self) -> dict:
        d = asdict(self)
        d["results"] = [asdict(h) for h in self.results]
        return d


def uncertainty(log_var: np.ndarray) -> np.ndarray:
    """Σσ² over dimensions: the one uncertainty unit of queries, hits, eval and calibration."""
    return np.exp(log_var.astype(np.float64)).sum(axis=-1)


def match_params(manifest: dict) -> tuple[float, float, int]:
    """(a, b, J) of an index's match probability: the learned a, b its producer recorded, and
    the Monte-Carlo samples it was built for."""
    p = manifest.get("producer", {})
    return (float(p.get("match_a", 5.0)), float(p.get("match_b", 5.0)),
            int(manifest.get("mc_samples", MC_SAMPLES)))


def match_probability(mu_q, lv_q, mu_d, lv_d, ids, a: float, b: float,
                      mc_samples: int) -> np.ndarray:
    """[M] p(match) of one query ([D]) with M items ([M, D], ids [M]) under a, b: the
    Monte-Carlo estimate with the fixed serving noise (the `mc` score, whatever score ranked
    them; the noise is keyed by id modulo its period, so a shard's local ids give the same)."""
    if not len(ids):
        return np.zeros(0)
    p = fixed_match_prob(*(np.asarray(x, np.float32) for x in (mu_q[None], lv_q[None], mu_d, lv_d)),
                         np.asarray(ids), a, b, mc_samples)
    return p[0]


def make_hits(ids, keys, p_match, unc, meta) -> list[Hit]:
    """Hits ranked as given: ids, keys, p_match, uncertainty [k], meta [(group, item)]."""
    return [Hit(rank=r + 1, id=int(i), score=float(key), p_match=float(p),
                uncertainty=float(u), item=item, group=int(group))
            for r, (i, key, p, u, (group, item)) in enumerate(zip(ids, keys, p_match, unc, meta))]


class SearchEngine:
    """Search one index directory. `encoder` turns text or an image file into a Gaussian
    (encode_text(text) -> (μ, log_var, unknown words), encode_image(path) -> (μ, log_var));
    or `make_encoder(manifest, index_dir)` builds it from the index manifest when the manifest
    names a checkpoint (encoders.model.query.QueryEncoder.for_index). Without an encoder only
    search with given Gaussians (`search`, `search_batch`) works."""

    def __init__(self, index_dir: str | Path, encoder=None, make_encoder=None):
        self.reader = IndexReader.open(Path(index_dir))
        self.encoder = encoder
        if encoder is None and make_encoder is not None \
                and self.reader.manifest.get("producer", {}).get("checkpoint"):
            try:
                self.encoder = make_encoder(self.reader.manifest, self.reader.index_dir)
            except BaseException:
                self.reader.close()
                raise
        self._calibration = {m: Calibration.from_manifest(self.reader.manifest, m)
                             for m in ("text", "image")}
        a, b, mc_samples = match_params(self.reader.manifest)
        self.batch = BatchSearcher(self.reader, a, b, mc_samples=mc_samples)

    def close(self) -> None:
        self.batch.close()
        self.reader.close()

    def __enter__(self) -> "SearchEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encoder(self):
        if self.encoder is None:
            raise PcmeError(f"{self.reader.index_dir}: no query encoder was given to the engine")
        return self.encoder

    # -- search ----------------------------------------------------------------------------------
    def search_batch(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                     score: str = "elk", exact: bool = False) -> BatchResult:
        """Top-k of Q queries at once (arrays [Q, D]); see engine/batch.py."""
        return self.batch.search(modality, mu_q, lv_q, k, score, exact)

    def search(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
               score: str = "elk", exact: bool = False) -> tuple[list[Hit], dict, int]:
        """(hits, timings in ms, shortlist size: the number of candidates rescored)."""
        return self.search_many(modality, mu_q[None], lv_q[None], k, score, exact)[0]

    def search_many(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                    score: str = "elk", exact: bool = False) -> list[tuple[list[Hit], dict, int]]:
        """(hits, timings, shortlist size) per query of a [Q, D] batch: one search_batch call,
        then one σ and one metadata read for all hits (the service's micro-batches)."""
        res = self.search_batch(modality, mu_q, lv_q, k, score, exact)
        t = time.perf_counter()
        flat = res.ids.reshape(-1)
        mu_hits, lv_hits = self.hit_vectors(modality, res)
        meta = self.reader.meta(modality, flat)
        timings = {name: round(v, 3) for name, v in res.timings_ms.items()}
        timings["meta_ms"] = elapsed_ms(t)
        out, width = [], res.ids.shape[1]
        for q, (ids, keys) in enumerate(zip(res.ids, res.keys)):
            rows = slice(q * width, (q + 1) * width)
            # under mc the rank key already is the match probability: not drawn twice
            p_match = keys if score_name(score) == "mc" else self.match_probability(
                mu_q[q], lv_q[q], mu_hits[rows], lv_hits[rows], ids)
            out.append((make_hits(ids, keys, p_match, uncertainty(lv_hits[rows]), meta[rows]),
                        dict(timings), int(res.shortlist[q])))
        return out

    def hit_vectors(self, modality: str, res: BatchResult) -> tuple[np.ndarray, np.ndarray]:
        """(μ, log_var) [Q·k, D] of a batch result's hits: as the shortlist read them (list
        blocks), else one store read."""
        if res.vectors is not None:
            return tuple(v.reshape(res.ids.size, -1) for v in res.vectors)
        return self.reader.fetch(modality, res.ids.reshape(-1))

    def match_probability(self, mu_q, lv_q, mu_d, lv_d, ids) -> np.ndarray:
        """[M] p(match) of one query with M items under the index's a, b (see the function)."""
        b = self.batch
        return match_probability(mu_q, lv_q, mu_d, lv_d, ids, b.a, b.b, b.mc_samples)

    def confidence(self, query_modality: str, lv: np.ndarray) -> tuple[float | None, bool | None]:
        """(expected R@1 at the query's Σσ², whether it is below LOW_CONFIDENCE), or (None, None)
        when the index carries no calibration for queries of that modality."""
        calibration = self._calibration.get(query_modality)
        if calibration is None:
            return None, None
        expected = calibration.expected_r1(float(uncertainty(lv)))
        return expected, expected < LOW_CONFIDENCE

    def query_text(self, text: str, k: int = 10, score: str | None = None,
                   exact: bool = False) -> QueryResult:
        score = score_name(score or DEFAULT_SCORE["text"])
        t = time.perf_counter()
        encoder = self._encoder()
        mu, lv, unknown = encoder.encode_text(text)
        encode_ms = elapsed_ms(t)
        hits, timings, shortlist = self.search("image", mu, lv, k, score, exact)
        timings = {"encode_ms": encode_ms, **timings, "total_ms": elapsed_ms(t)}
        searched = None
        if hasattr(encoder, "words"):  # optional member of the encoder protocol
            dropped = set(unknown)
            searched = [w for w in encoder.words(text) if w not in dropped]
        return QueryResult(text, "image", score, float(uncertainty(lv)), hits,
                           *self.confidence("text", lv), timings, unknown, searched, shortlist)

    def query_image(self, path: str | Path, k: int = 10, score: str | None = None,
                    exact: bool = False) -> QueryResult:
        score = score_name(score or DEFAULT_SCORE["image"])
        t = time.perf_counter()
        mu, lv = self._encoder().encode_image(path)
        encode_ms = elapsed_ms(t)
        hits, timings, shortlist = self.search("text", mu, lv, k, score, exact)
        timings = {"encode_ms": encode_ms, **timings, "total_ms": elapsed_ms(t)}
        return QueryResult(str(path), "text", score, float(uncertainty(lv)), hits,
                           *self.confidence("image", lv), timings, shortlist_size=shortlist)

