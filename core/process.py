"""Process-wide settings, made once at the edge (cli.py, the service's start-up), never at import.

torch and faiss each bring an OpenMP runtime; with the default (active) wait policy the idle
threads of one spin on the cores the other needs, which turned 0.2 ms search stages into 15 ms on
a 2-core machine, so processes that search wait passively. Training and evaluation never load
faiss and keep the active policy (TORCH_ONLY): a training step of the default model took 0.50 s
passive against 0.35 s active on 2 cores (torch's many short parallel regions pay for waking
sleeping threads); `eval` 38–41 against 31–37 s. `encode` gained nothing (Lite0 images: 119
passive against 115 images/s active, with more CPU time per image) and stays passive. The
policy must be set before either library loads; an explicit setting wins.

numpy's own BLAS (the OpenBLAS in its wheel) runs on one thread. Its thread pool does not
follow OMP_WAIT_POLICY: after any numpy product big enough to split, its idle threads spin for
~2^28 cycles (~0.1 s), and the search makes such products on every batch, so on 2 cores one
core was always taken (seen as CPU time of numpy's pool thread during μ-only batches). With
one thread there is no pool to spin: 1M × 256 batch QPS in one bench run went μ 4,389 → 7,816,
elk 2,245 → 5,225, mc 221 → 472. numpy's products here are small (torch does the big ones);
an explicit OPENBLAS_NUM_THREADS wins. The limit is set at run time (threadpoolctl), because
numpy is usually imported before this runs, after which its environment variables are read.
PIL's decompression-bomb limit bounds what one uploaded or query image may cost.

A process that has loaded an engine holds ~275k Python objects of torch, numba and faiss, and
Python's full (generation-2) collection walks all of them: 107-130 ms measured at 1M x 256,
and 19-135 ms pauses during one bench run, which landed inside single queries (elk p99 45-78
ms against a p50 of 1-2 ms). `settle_heap` collects once after start-up and then exempts every
object alive from later collections (gc.freeze), so the collector only walks what queries
allocate.
"""
from __future__ import annotations

import gc
import os

MAX_IMAGE_PIXELS = 100_000_000


TORCH_ONLY = frozenset({"train", "eval"})   # cli.py commands that never load faiss (see above)


def configure_process(command: str | None = None) -> None:
    """`command`: the cli.py command about to run (None: a process that may search)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if command in TORCH_ONLY else "PASSIVE")
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        numpy_blas_threads(1)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def numpy_blas_threads(n: int) -> None:
    """Limit the BLAS libraries that numpy's wheel brought (numpy.libs) to n threads; torch's
    and faiss' own libraries are left alone."""
    import numpy
    from threadpoolctl import ThreadpoolController

    home = os.path.dirname(os.path.dirname(numpy.__file__))
    ours = (os.path.join(home, "numpy") + os.sep, os.path.join(home, "numpy.libs") + os.sep)
    controller = ThreadpoolController()
    paths = [lib["filepath"] for lib in controller.info()
             if lib["user_api"] == "blas" and lib["filepath"].startswith(ours)]
    if paths:
        controller.select(filepath=paths).limit(limits=n)


def default_threads() -> int:
    """Threads of a parallel search or score: the cores this process may use (all of them
    where the platform cannot say, e.g. macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def settle_heap() -> None:
    """After start-up (engines loaded and warmed): one full collection, then every object alive
    is left out of later ones (see the module docstring). Call again after replacing an engine:
    the frozen objects become collectable first, so the old engine's cycles are freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
