"""Search a sharded index (indexer/distributed.py, `index --ray ... --sharded`) with one Ray
actor per shard, merged exactly.

Each shard is an ordinary index directory over one id range of one modality, all shards of a
modality sharing one trained quantizer. An actor holds the ordinary engine (SearchEngine) on
its shard and answers with its local top-k; every score of the contract depends only on the
query–item pair (mc included: shard offsets are multiples of the noise period), so the top-k
of the union of the shards' top-k lists is the top-k of the whole index. Ties are broken by
score, then by global id.

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
from indexer.manifest import MODALITIES, read_manifest  # not shards.py: no pyarrow to query

from engine.search import QueryResult, SearchEngine, uncertainty

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
    """The actor: the ordinary engine over one shard directory."""

    def __init__(self, index_dir: str, name: str):
        self.engine, self.name = SearchEngine(index_dir), name

    def ready(self) -> int:
        return os.getpid()

    def search_batch(self, modality, mu_q, lv_q, k, score, exact):
        fault_point(f"search-{self.name}")
        res = self.engine.search_batch(modality, mu_q, lv_q, k, score, exact)
        return res.ids, res.keys

    def search(self, modality, mu_q, lv_q, k, score, exact):
        fault_point(f"search-{self.name}")
        return self.engine.search(modality, mu_q, lv_q, k, score, exact)


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

    def _fan_out(self, modality: str, method: str, *args) -> tuple[list, list[str]]:
        """[(shard entry, answer)] of every shard of `modality`, and the names of the missing."""
        if modality not in MODALITIES:
            raise PcmeError(f"modality {modality!r}: expected one of {MODALITIES}")
        mine = [(s, a) for s, a in zip(self.shards, self.actors) if s["modality"] == modality]
        refs = [getattr(a, method).remote(modality, *args) for _, a in mine]
        answers, missing = [], []
        for (shard, actor), ref in zip(mine, refs):
            answer = self._answer(ref, lambda a=actor: getattr(a, method).remote(modality, *args))
            if answer is None:
                missing.append(shard["dir"])
            else:
                answers.append((shard, answer))
        if missing:
            logger.warning("%s: shards %s did not answer; the result is partial",
                           self.index_dir, ", ".join(missing))
        return answers, missing

    def _answer(self, ref, resend):
        """The shard's answer to `ref`; if its actor was lost, the query again once Ray has
        restarted it (calls fail fast while it restarts); None when it is gone for good
        (restarts used up, killed) or does not answer within SHARD_TIMEOUT_S."""
        errors, deadline = self.ray.exceptions, time.monotonic() + SHARD_TIMEOUT_S
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

    def search_batch(self, modality: str, mu_q: np.ndarray, lv_q: np.ndarray, k: int = 10,
                     score: str = "elk", exact: bool = False) -> ShardedBatch:
        score = score_name(score)
        answers, missing = self._fan_out(modality, "search_batch", mu_q, lv_q, k, score, exact)
        if not answers:
            raise PcmeError(f"{self.index_dir}: no shard of {modality} answered")
        ids = np.concatenate([local + s["id_offset"] for s, (local, _) in answers], axis=1)
        keys = np.concatenate([keys for _, (_, keys) in answers], axis=1)
        order = np.lexsort((ids, -keys), axis=1)[:, :k]  # last key first: score, then id
        return ShardedBatch(np.take_along_axis(ids, order, 1), np.take_along_axis(keys, order, 1),
                            missing)

    def search(self, modality: str, mu: np.ndarray, lv: np.ndarray, k: int = 10,
               score: str = "elk", exact: bool = False) -> tuple[list, dict, list[str]]:
        """(hits with global ids, timings, missing shards) for one query. The hits are the
        shards' own (whatever fields the engine gives them), re-ranked."""
        t = time.perf_counter()
        answers, missing = self._fan_out(modality, "search", mu, lv, k, score, exact)
        if not answers:
            raise PcmeError(f"{self.index_dir}: no shard of {modality} answered")
        hits = []
        for shard, (shard_hits, *_) in answers:  # (hits, timings, shortlist size)
            for h in shard_hits:
                h.id += shard["id_offset"]
                hits.append(h)
        hits.sort(key=lambda h: (-h.score, h.id))
        for rank, h in enumerate(hits[:k], 1):
            h.rank = rank
        return hits[:k], {"shards_ms": round((time.perf_counter() - t) * 1000, 3)}, missing

    def _query(self, query: str, modality: str, mu, lv, k, score, exact, unknown=()):
        score = score_name(score)
        t = time.perf_counter()
        hits, timings, missing = self.search(modality, mu, lv, k, score, exact)
        timings["total_ms"] = round((time.perf_counter() - t) * 1000, 3)
        return ShardedQueryResult(query=query, modality=modality, score=score,
                                  query_uncertainty=float(uncertainty(lv)), results=hits,
                                  timings_ms=timings, unknown_words=list(unknown),
                                  partial=bool(missing), missing_shards=missing)

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
