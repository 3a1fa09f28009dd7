"""Search a sharded index (indexer/distributed.py, `index --ray ... --sharded`) with one Ray
actor per shard, merged exactly.

Each shard is an ordinary index directory over one id range of one modality, all shards of a
modality sharing one trained quantizer. An actor holds the ordinary engine (SearchEngine) on
its shard and answers with its local top-k as small [Q, k] numpy arrays (ids, rank keys and,
for served queries, each hit's p(match), uncertainty, group and item); the driver merges them.
Every score of the contract, and p(match), depends only on the query–item pair (mc included:
shard offsets are multiples of the noise period), so the top-k of the union of the shards'
top-k lists is the top-k of the whole index, with the same numbers. Ties are broken by score,
then by global id. p(match) is computed in the shards, in parallel, rather than on the driver
after the merge: that keeps the driver's serial part (and the reply) small, which measured
faster with one shard per core (README, "Scaling out").

A shard actor that dies is restarted by Ray and the query is sent to it once more; if that
fails too (or times out), the answer is built from the other shards and says
`partial: true` with the missing shards named.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import manifest_kind
from core.cluster import fault_point, import_ray
from core.errors import PcmeError
from core.scores import DEFAULT_SCORE, score_name
from core.timing import elapsed_ms
from indexer.manifest import MODALITIES, read_manifest  # not shards.py: no pyarrow to query

from engine.search import QueryResult, SearchEngine, make_hits, uncertainty

logger = logging.getLogger(__name__)

SHARDED_KIND = "sharded-index"   # the manifest kind indexer/distributed.py writes
SHARD_TIMEOUT_S = 120.0          # one shard's answer (a restart included) may take this long
RESTART_POLL_S = 0.2             # while a shard actor restarts, the query is resent this often
ACTOR_RESTARTS = 4               # restarts Ray may make of each shard actor over its life


@dataclass
class ShardedQueryResult(QueryResult):
    partial: bool = False                               # some shard did not answer
    missing_shards: list[str] = field(default_factory=list)


@dataclass
class ShardedBatch:
    ids: np.ndarray          # [Q, k] global ids, best first
    keys: np.ndarray         # [Q, k] rank keys (higher is better)
    missing: list[str]       # shards that did not answer


class ShardServer:
    """The actor: the ordinary engine over one shard directory. Answers are plain numpy
    arrays (cheap to serialise); the driver ranks, merges and builds the hits."""

    def __init__(self, index_dir: str, name: str):
        self.engine, self.name = SearchEngine(index_dir), name

    def ready(self) -> int:
        return os.getpid()

    def top(self, request: tuple) -> dict:
        """The shard's top-k for `request` = (modality, μ [Q, D], log σ² [Q, D], k, score,
        exact, details): [Q, k] local ids and rank keys, [Q] shortlist sizes; with `details`,
        also what a hit shows ([Q, k] p(match), uncertainty, group, item), so the driver needs
        no second round trip for the winners. One argument, because Ray serialises each
        argument of a call apart. Items stay Python strings (an object array): a fixed-width
        unicode array would drop trailing NULs, and pickling it saved nothing measurable."""
        modality, mu_q, lv_q, k, score, exact, details = request
        fault_point(f"search-{self.name}")
        res = self.engine.search_batch(modality, mu_q, lv_q, k, score, exact)
        out = {"ids": res.ids, "keys": res.keys, "shortlist": res.shortlist}
        if details:
            flat, shape = res.ids.reshape(-1), res.ids.shape
            mu, lv = (x.reshape(*shape, -1) for x in self.engine.hit_vectors(modality, res))
            meta = self.engine.reader.meta(modality, flat)
            p_match = [self.engine.match_probability(*query, ids) for query, ids in
                       zip(zip(mu_q, lv_q, mu, lv), res.ids)]
            out.update(p_match=np.array(p_match, np.float64).reshape(shape),
                       uncertainty=uncertainty(lv),
                       groups=np.array([g for g, _ in meta], np.int64).reshape(shape),
                       items=np.array([i for _, i in meta], object).reshape(shape))
        return out


def is_sharded(index_dir: str | Path) -> bool:
    return manifest_kind(Path(index_dir)) == SHARDED_KIND


class ShardedEngine:
    """Query side of a sharded index, on the connected Ray cluster. `encoder`/`make_encoder`
    as for SearchEngine (the top manifest names the checkpoint)."""

    def __init__(self, index_dir: str | Path, encoder=None, make_encoder=None):
        self.ray = import_ray()
        self.index_dir = Path(index_dir)
        self.manifest = read_manifest(self.index_dir, SHARDED_KIND)
        self.shards = self.manifest.get("shards")
        if not isinstance(self.shards, list) or not self.shards:
            raise PcmeError(f"{self.index_dir}/manifest.json: lists no shards")
        server = self.ray.remote(num_cpus=0, max_restarts=ACTOR_RESTARTS)(ShardServer)
        self.actors = [server.remote(str(self.index_dir / s["dir"]), s["dir"]) for s in self.shards]
        self.ray.get([a.ready.remote() for a in self.actors])
        self.encoder = encoder
        if encoder is None and make_encoder is not None and self.manifest.get("producer", {}).get("checkpoint"):
            self.encoder = make_encoder(self.manifest, self.index_dir)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> "ShardedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fan_out(self, modality: str, *request) -> tuple[list, list[str]]:
        """[(shard entry, answer of `top`)] of every shard of `modality`, and the names of the
        missing. One `ray.get` for all shards; only when that fails is each looked at alone."""
        if modality not in MODALITIES:
            raise PcmeError(f"modality {modality!r}: expected one of {MODALITIES}")
        mine = [(s, a) for s, a in zip(self.shards, self.actors) if s["modality"] == modality]
        request = (modality, *request)
        refs = [a.top.remote(request) for _, a in mine]
        deadline = time.monotonic() + SHARD_TIMEOUT_S
        try:
            return list(zip([s for s, _ in mine], self.ray.get(refs, timeout=SHARD_TIMEOUT_S))), []
        except self.ray.exceptions.RayError:  # a shard lost its actor (or timed out)
            pass
        answers, missing = [], []
        for (shard, actor), ref in zip(mine, refs):
            answer = self._answer(ref, lambda a=actor: a.top.remote(request), deadline)
            if answer is None:
                missing.append(shard["dir"])
            else:
                answers.append((shard, answer))
        if missing:
            logger.warning("%s: shards %s did not answer; the result is partial",
                           self.index_dir, ", ".join(missing))
        return answers, missing

    def _answer(self, ref, resend, deadline: float):
        """The shard's answer to `ref`; if its actor was lost, the query again once Ray has
        restarted it (calls fail fast while it restarts); None when it is gone for good
        (restarts used up, killed) or does not answer by `deadline`."""
        errors = self.ray.exceptions
        while True:
            try:
                return self.ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except errors.ActorUnavailableError:   # restarting (or unreachable for now)
                if time.monotonic() > deadline:
                    return None
                time.sleep(RESTART_POLL_S)
            except (errors.RayActorError, errors.GetTimeoutError) as e:
                logger.warning("a shard actor is gone (%s)", type(e).__name__)
                return None
            ref = resend()

    def _merged(self, modality, mu_q, lv_q, k, score, exact, details) -> tuple[dict, list[str]]:
        """The shards' answers merged exactly: the best k of the union by rank key, then by
        global id; every array of the answers [Q, ...] taken in that order."""
        answers, missing = self._fan_out(modality, mu_q, lv_q, k, score, exact, details)
        if not answers:
            raise PcmeError(f"{self.index_dir}: no shard of {modality} answered")
        merged = {name: np.concatenate([a[name] for _, a in answers], axis=1)
                  for name in answers[0][1] if name != "shortlist"}
        merged["ids"] = np.concatenate([a["ids"] + s["id_offset"] for s, a in answers], axis=1)
        order = np.lexsort((merged["ids"], -merged["keys"]), axis=1)[:, :k]  # score, then id
        for name, v in merged.items():
            merged[name] = np.take_along_axis(v, order.reshape(*order.shape, *[1] * (v.ndim - 2)), 1)
        merged["shortlist"] = sum(a["shortlist"] for _, a in answers)
        return merged, missing

    def search_batch(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                     score: str = "elk", exact: bool = False) -> ShardedBatch:
        merged, missing = self._merged(modality, mu_q, lv_q, k, score_name(score), exact, False)
        return ShardedBatch(merged["ids"], merged["keys"], missing)

    def search(self, modality: str, mu: np.ndarray, lv: np.ndarray, k: int = 10,
               score: str = "elk", exact: bool = False) -> tuple[list, dict, list[str]]:
        """(hits with global ids, timings, missing shards) for one query."""
        answers, missing = self.answers(modality, mu[None], lv[None], k, score, exact)
        hits, timings, _ = answers[0]
        return hits, timings, missing

    def search_many(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                    score: str = "elk", exact: bool = False) -> list[tuple[list, dict, int]]:
        """As SearchEngine.search_many (the service's micro-batches); missing shards are logged."""
        return self.answers(modality, mu_q, lv_q, k, score, exact)[0]

    def answers(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                score: str = "elk", exact: bool = False) -> tuple[list, list[str]]:
        """([(hits, timings, shortlist size summed over the shards)] per query of a [Q, D]
        batch, missing shards): one round trip to every shard, then the merge."""
        t = time.perf_counter()
        mu_q, lv_q = np.asarray(mu_q, np.float32), np.asarray(lv_q, np.float32)
        m, missing = self._merged(modality, mu_q, lv_q, k, score_name(score), exact, True)
        timings = {"shards_ms": elapsed_ms(t)}
        out = []
        for q in range(len(mu_q)):
            hits = make_hits(m["ids"][q], m["keys"][q], m["p_match"][q], m["uncertainty"][q],
                             list(zip(m["groups"][q].tolist(), m["items"][q].tolist())))
            out.append((hits, dict(timings), int(m["shortlist"][q])))
        return out, missing

    def _query(self, query: str, modality: str, mu, lv, k, score, exact, unknown=()):
        score = score_name(score)
        t = time.perf_counter()
        answers, missing = self.answers(modality, mu[None], lv[None], k, score, exact)
        hits, timings, shortlist = answers[0]
        timings["total_ms"] = elapsed_ms(t)
        return ShardedQueryResult(query=query, modality=modality, score=score,
                                  query_uncertainty=float(uncertainty(lv)), results=hits,
                                  timings_ms=timings, unknown_words=list(unknown),
                                  shortlist_size=shortlist, partial=bool(missing),
                                  missing_shards=missing)

    def query_text(self, text: str, k: int = 10, score: str | None = None,
                   exact: bool = False) -> ShardedQueryResult:
        mu, lv, unknown = self._encoder().encode_text(text)
        return self._query(text, "image", mu, lv, k, score or DEFAULT_SCORE["text"], exact,
                           unknown)

    def query_image(self, path: str | Path, k: int = 10, score: str | None = None,
                    exact: bool = False) -> ShardedQueryResult:
        mu, lv = self._encoder().encode_image(path)
        return self._query(str(path), "text", mu, lv, k, score or DEFAULT_SCORE["image"], exact)

    def _encoder(self):
        if self.encoder is None:
            raise PcmeError(f"{self.index_dir}: no query encoder was given to the engine")
        return self.encoder
