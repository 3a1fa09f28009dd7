"""Process-wide settings, made once at the edge (cli.py, the service's start-up), never at import.

torch and faiss each bring an OpenMP runtime; with the default (active) wait policy the idle
threads of one spin on the cores the other needs, which turned 0.2 ms search stages into 15 ms on
a 2-core machine. The policy must be set before either library loads; an explicit setting wins.
PIL's decompression-bomb limit bounds what one uploaded or query image may cost.
"""
from __future__ import annotations

import os

MAX_IMAGE_PIXELS = 100_000_000


def configure_process() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
