"""Request counts and latency histograms, served at /metrics in Prometheus' text format
(written by hand: a few counters do not need a client library)."""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets + ("+Inf",), self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {total}")
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches = Histogram(BATCH_BUCKETS)
        self.rejected = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[method, route, status] += 1
            if route not in self.latency:
                self.latency[route] = Histogram(LATENCY_BUCKETS)
            self.latency[route].observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, gauges: dict[str, float]) -> str:
        with self._lock:
            lines = ["# TYPE pcme_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'pcme_requests_total{{method="{method}",route="{route}",'
                             f'status="{status}"}} {n}')
            lines.append("# TYPE pcme_request_seconds histogram")
            for route, h in sorted(self.latency.items()):
                lines += h.lines("pcme_request_seconds", f'route="{route}"')
            lines.append("# TYPE pcme_batch_size histogram")
            lines += self.batches.lines("pcme_batch_size", "")
            lines.append("# TYPE pcme_rejected_total counter")
            lines.append(f"pcme_rejected_total {self.rejected}")
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
