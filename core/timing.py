"""Stage timings: the one way search code measures how long a step took."""
from __future__ import annotations

import time


def elapsed_ms(t0: float) -> float:
    """Milliseconds since t0 (a time.perf_counter() value), to the microsecond."""
    return round((time.perf_counter() - t0) * 1000, 3)
