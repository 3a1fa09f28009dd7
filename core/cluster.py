"""Ray for the scale-out jobs: connect to a cluster (or start a local one), run parts on a pool
of actors that survives lost workers and nodes, and the fault hooks the tests inject through.

Ray is optional (`pip install 'pcme-search[ray]'`): it is imported only when a job asks for it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Hashable

from core.errors import PcmeError

logger = logging.getLogger(__name__)

RAY_HINT = "Ray is not installed: pip install 'pcme-search[ray]' (ray[data]==2.58.0)"
OBJECT_STORE_BYTES = 80 << 20   # the jobs pass file paths and small arrays, never datasets
MAX_ATTEMPTS = 3                # a part whose actor died this often fails the job
ACTOR_START_S = 300.0           # a pool with no live actor waits this long for a replacement
FAULT_ENV = "PCME_FAULT_DIR"    # test hook: folder of fault requests (see fault_point)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def import_ray():
    try:
        import ray
    except ImportError:
        raise PcmeError(RAY_HINT) from None
    return ray


def ray_runtime_env() -> dict:
    """Workers import this project's code: from the same path as the driver (a shared
    filesystem, or the same install on every node), and they see the fault hook folder."""
    env = {"PYTHONPATH": str(PROJECT_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    for name in (FAULT_ENV, "OMP_WAIT_POLICY"):  # the process settings made at the edge
        if os.environ.get(name):
            env[name] = os.environ[name]
    return {"env_vars": env}


class RayConnection:
    """What ray_cluster returns: `with` it to get the ray module; leaving the block shuts
    down the Ray instance this process started (never a cluster it only joined)."""

    def __init__(self, ray, owned: bool):
        self.ray, self.owned = ray, owned

    def __enter__(self):
        return self.ray

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()


def ray_cluster(address: str) -> RayConnection:
    """Connect now (errors are PcmeError). `local:N` starts a Ray instance with N worker CPUs
    on this machine, shut down after the `with` block; anything else is the address of a
    running cluster (`ray start --head` prints it; "auto" finds the local one), which stays
    up. Already connected (tests): used as is."""
    n = address.removeprefix("local:") if address.startswith("local:") else None
    if n is not None and (not n.isdigit() or int(n) < 1):
        raise PcmeError(f"--ray {address!r}: expected local:N with N >= 1 worker processes")
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return RayConnection(ray, owned=False)
    if n is not None:
        # address="local": a new instance even where another cluster on this machine is
        # findable (a plain init would join it, and refuse num_cpus)
        ray.init(address="local", num_cpus=int(n), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES,
                 runtime_env=ray_runtime_env(), logging_level=logging.WARNING)
    else:
        try:
            ray.init(address=address, runtime_env=ray_runtime_env(),
                     logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise PcmeError(f"--ray {address!r}: cannot connect ({str(e).splitlines()[0]})") from None
    return RayConnection(ray, owned=True)


def worker_count(ray) -> int:
    """CPU slots of the cluster: one actor per slot."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_on_actors(ray, make_actor: Callable[[], object], n_actors: int, parts: list,
                  call: Callable[[object, object], object], key: Callable[[object], Hashable] = str,
                  on_done: Callable[[object, object], None] | None = None,
                  pool: list | None = None) -> dict:
    """Run `call(actor, part)` for every part on a pool of `n_actors` actors, each part on
    whichever actor is free. An actor that dies (its worker killed, its node removed) gives
    its part back to the queue and is replaced; the replacement joins once it answers
    `ready()`, so a node that is gone for good only shrinks the pool. Returns {key: result},
    plus the number of actors lost under the key None. `pool`: ready actors to use instead
    of starting `n_actors` (a benchmark times the work without the start-up)."""
    queue, attempts, results, deaths = list(parts), {key(p): 0 for p in parts}, {}, 0
    idle, joining, busy = list(pool or []), {}, {}
    for _ in range(0 if pool else min(n_actors, len(parts)) or 1):
        actor = make_actor()
        joining[actor.ready.remote()] = actor
    deadline = time.monotonic() + ACTOR_START_S
    while queue or busy:
        while queue and idle:
            part, actor = queue.pop(0), idle.pop()
            attempts[key(part)] += 1
            busy[call(actor, part)] = (actor, part)
        if not busy and not idle and time.monotonic() > deadline:
            raise PcmeError(f"no Ray worker could be started in {ACTOR_START_S:.0f} s "
                            f"({len(queue)} parts left)")
        ready, _ = ray.wait(list(busy) + list(joining), num_returns=1, timeout=10.0)
        for ref in ready:
            if ref in joining:
                actor = joining.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayActorError:
                    deaths += 1
                continue
            actor, part = busy.pop(ref)
            try:
                results[key(part)] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                deaths += 1
                logger.warning("part %s lost with its worker (%s); retrying", key(part),
                               type(e).__name__)
                if attempts[key(part)] >= MAX_ATTEMPTS:
                    raise PcmeError(f"part {key(part)}: its worker died {MAX_ATTEMPTS} times") from None
                queue.append(part)
                replacement = make_actor()
                joining[replacement.ready.remote()] = replacement
                deadline = time.monotonic() + ACTOR_START_S
                continue
            idle.append(actor)
            if on_done is not None:
                on_done(part, results[key(part)])
    for actor in idle + list(joining.values()):
        if actor not in (pool or []):  # a pool handed in stays the caller's
            ray.kill(actor)
    if deaths:
        logger.warning("%d worker(s) lost during the job; every part completed", deaths)
    results[None] = deaths
    return results


def fault_point(name: str) -> None:
    """Test hook, inert unless $PCME_FAULT_DIR is set. `kill-<name>` there: the first worker
    to reach this point claims it (renamed to `killed-<name>`, so a retry runs clean) and
    dies at once, as a crashed process would. `hold-<name>`: the worker claims it as
    `held-<name>`, writes its Ray node id to `node-<name>` and waits until `held-<name>` is
    removed (the test does something meanwhile, such as removing that node)."""
    folder = os.environ.get(FAULT_ENV)
    if not folder:
        return
    base = Path(folder)
    if _claim(base / f"kill-{name}", base / f"killed-{name}"):
        logger.warning("fault hook: killing this worker at %s", name)
        os._exit(1)
    if _claim(base / f"hold-{name}", base / f"held-{name}"):
        (base / f"node-{name}").write_text(_node_id())  # where the test can strike
        while (base / f"held-{name}").exists():
            time.sleep(0.05)


def _node_id() -> str:
    ray = import_ray()
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _claim(request: Path, claimed: Path) -> bool:
    try:
        os.rename(request, claimed)  # atomic: exactly one process wins the request
    except FileNotFoundError:
        return False
    return True
