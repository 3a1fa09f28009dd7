"""Where a sharded query's time goes, and an A/B of its reply path, on indexes already built.

Engines timed in turn on each query after a warm pass over all queries (so a change in the
machine's load hits all alike): the single index; the sharded engine (engine/sharded.py); and
the previous reply path ("hits"): every shard runs the engine's full `search` (its hits with
p(match), metadata) and the driver collects them one `ray.get` per shard and re-sorts them.
Then one sharded query is taken apart: the driver's wait in `ray.get`, the actor's time in
its method, and what the reply costs to serialise (`pickle.dumps`, `ray.put`).

    python -m benchmarks.ray_scale --phase single SHARDS single/      # or --keep a ray_scale run
    python -m benchmarks.ray_scale --phase ray SHARDS sharded/ 262144 2 sharded
    python -m benchmarks.sharded_query --single single/ --sharded sharded/ [--queries 100]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.report import finish_report
from core.process import configure_process

K, SCORE = 10, "elk"


def probe_server():
    """A shard actor class that also answers the previous way and times itself. Made here,
    not at import: the engine loads torch, which must come after configure_process (an
    OpenMP runtime loaded first keeps spinning threads that would bill the driver)."""
    from engine.sharded import ShardServer

    class ProbeServer(ShardServer):
        def hits(self, modality, mu_q, lv_q, k, score, exact):
            return self.engine.search(modality, mu_q[0], lv_q[0], k, score, exact)

        def timed(self, method, *args):
            """(reply, ms spent in the method, ms to pickle the reply, its pickled bytes)."""
            t = time.perf_counter()
            out = getattr(self, method)(*args)
            ms = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            size = len(pickle.dumps(out, protocol=5))
            return out, ms, (time.perf_counter() - t) * 1000, size

    return ProbeServer


def hits_search(ray, actors, offsets, mu, lv):
    """The previous driver: one get per shard, hits re-ranked by (score, id)."""
    refs = [a.hits.remote("image", mu[None], lv[None], K, SCORE, False) for a in actors]
    merged = []
    for ref, offset in zip(refs, offsets):
        for h in ray.get(ref)[0]:
            h.id += offset
            merged.append(h)
    merged.sort(key=lambda h: (-h.score, h.id))
    return merged[:K]


def pct(v: list[float], q: float) -> float:
    return round(float(np.percentile(v, q)), 2)


def timed_runs(engines: dict, mu, lv) -> dict:
    times = {name: [] for name in engines}
    for timed in (False, True):
        for i in range(len(mu)):
            for name, run in engines.items():
                t = time.perf_counter()
                run(mu[i], lv[i])
                if timed:
                    times[name].append((time.perf_counter() - t) * 1000)
    out = {name: {"p50": pct(v, 50), "p90": pct(v, 90)} for name, v in times.items()}
    for name in engines:
        out[name]["ratio_p50"] = round(out[name]["p50"] / out["single"]["p50"], 2)
    return out


def profile(ray, actors, mu, lv, repeats: int = 20) -> dict:
    """Medians over `repeats` queries of where one sharded query's time goes."""
    rows = {m: {"driver_ms": [], "actor_ms": [], "pickle_ms": [], "put_ms": []}
            for m in ("top", "hits")}
    size = {}
    for i in range(repeats):
        for method, args in (("top", (("image", mu[i][None], lv[i][None], K, SCORE, False, True),)),
                             ("hits", ("image", mu[i][None], lv[i][None], K, SCORE, False))):
            t = time.perf_counter()
            got = ray.get([a.timed.remote(method, *args) for a in actors])
            r = rows[method]
            r["driver_ms"].append((time.perf_counter() - t) * 1000)
            r["actor_ms"].append(max(g[1] for g in got))
            r["pickle_ms"].append(sum(g[2] for g in got))
            t = time.perf_counter()
            for g in got:
                ray.put(g[0])
            r["put_ms"].append((time.perf_counter() - t) * 1000)
            size[method] = sum(g[3] for g in got)
    out = {m: {k: round(statistics.median(v), 3) for k, v in r.items()} for m, r in rows.items()}
    for m in rows:
        out[m]["reply_bytes_all_shards"] = size[m]
    out["ping_all_shards_ms"] = round(statistics.median(ping(ray, actors) for _ in range(repeats)), 3)
    return out


def proc_cpu_s(pids) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far."""
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_per_query(engines: dict, pids: list[int], mu, lv) -> dict:
    """CPU ms per query of each engine, run alone over all queries: the driver's (this
    process) and the shard actors' (all of them; an idle actor costs next to nothing). On a
    machine whose cores others keep busy, latency follows this more than parallelism."""
    out = {}
    for name, run in engines.items():
        driver, actors = time.process_time(), proc_cpu_s(pids)
        for i in range(len(mu)):
            run(mu[i], lv[i])
        out[name] = {"driver": round((time.process_time() - driver) * 1000 / len(mu), 2),
                     "actors": round((proc_cpu_s(pids) - actors) * 1000 / len(mu), 2)}
    return out


def ping(ray, actors) -> float:
    """ms of one empty call to every shard actor: Ray's own floor per sharded query."""
    t = time.perf_counter()
    ray.get([a.ready.remote() for a in actors])
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--single", required=True)
    ap.add_argument("--sharded", required=True)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    configure_process()
    from benchmarks.ray_scale import single_shards
    from core.cluster import ray_cluster
    from engine.search import SearchEngine
    from engine.sharded import ShardedEngine
    from indexer.shards import load_shards

    q = load_shards(single_shards(Path(a.single)), "text")
    mu, lv = q.mu[:a.queries], q.log_var[:a.queries]
    report = {"queries": len(mu), "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    with ray_cluster(f"local:{a.workers}") as ray, SearchEngine(a.single) as one, \
            ShardedEngine(a.sharded) as many:
        shards = [s for s in many.shards if s["modality"] == "image"]
        server = ray.remote(num_cpus=0)(probe_server())
        probes = [server.remote(str(Path(a.sharded) / s["dir"]), s["dir"]) for s in shards]
        ray.get([p.ready.remote() for p in probes])
        offsets = [s["id_offset"] for s in shards]
        engines = {"single": lambda m, v: one.search("image", m, v, K, SCORE),
                   "sharded": lambda m, v: many.search("image", m, v, K, SCORE),
                   "hits": lambda m, v: hits_search(ray, probes, offsets, m, v)}
        report["image_shards"] = len(shards)
        report["p_ms"] = timed_runs(engines, mu, lv)
        print(json.dumps(report["p_ms"]), flush=True)
        pids = ray.get([a.ready.remote() for a in probes + many.actors])
        report["cpu_ms_per_query"] = cpu_per_query(engines, pids, mu, lv)
        report["profile"] = profile(ray, probes, mu, lv)
        for p in probes:
            ray.kill(p)
    finish_report(report, a.json)


if __name__ == "__main__":
    main()
