"""Process-wide settings, made once at the edge (cli.py, the service's start-up), never at import.

torch and faiss each bring an OpenMP runtime; with the default (active) wait policy the idle
threads of one spin on the cores the other needs, which turned 0.2 ms search stages into 15 ms on
a 2-core machine, so processes that search wait passively. Training and evaluation never load
faiss and keep the active policy (TORCH_ONLY): a training step of the default model took 0.50 s
passive against 0.35 s active on 2 cores (torch's many short parallel regions pay for waking
sleeping threads); `eval` 38–41 against 31–37 s. `encode` gained nothing (Lite0 images: 119
passive against 115 images/s active, with more CPU time per image) and stays passive. The
policy must be set before either library loads; an explicit setting wins.
PIL's decompression-bomb limit bounds what one uploaded or query image may cost.
"""
from __future__ import annotations

import os

MAX_IMAGE_PIXELS = 100_000_000


TORCH_ONLY = frozenset({"train", "eval"})   # cli.py commands that never load faiss (see above)


def configure_process(command: str | None = None) -> None:
    """`command`: the cli.py command about to run (None: a process that may search)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if command in TORCH_ONLY else "PASSIVE")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
