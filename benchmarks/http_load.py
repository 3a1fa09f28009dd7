"""HTTP load on the search service: latency percentiles, QPS, errors and 503s per concurrency,
with and without micro-batching, and the server's RSS before and after.

    python benchmarks/http_load.py --index runs/svc-index

Starts `cli.py serve` on a free loopback port once per mode (--max-batch 32, then 1), waits for
/readyz, warms up, then runs keep-alive connections issuing GET /api/v1/search with captions of
the index as text queries. Loopback only (any other --host is refused), and bounded: at most
--requests requests and --max-seconds seconds per concurrency level.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np

from indexer.reader import IndexReader

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 5000


def loopback(host: str) -> str:
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: --host {host}: the load test talks to loopback addresses only")
    return host


def captions(index: Path, n: int = 200) -> list[str]:
    with IndexReader.open(index) as reader:
        count = reader.count("text")
        ids = np.unique(np.linspace(0, count - 1, min(n, count)).astype(np.int64))
        return [item for _, item in reader.meta("text", ids)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`cli.py serve` in a subprocess; stopped with SIGTERM."""

    def __init__(self, index: Path, host: str, max_batch: int, extra: list[str]):
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, "cli.py", "serve", "--index", f"bench={index}", "--host", host,
             "--port", str(self.port), "--max-batch", str(max_batch), *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited with {self.proc.returncode}")
            try:
                status, _, _ = await one_request(self.host, self.port, "/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise SystemExit("error: the server was not ready in time")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


async def one_request(host, port, path):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await exchange(reader, writer, host, path)
    finally:
        writer.close()


async def exchange(reader, writer, host, path) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 keep-alive request: (status, headers, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def load(host, port, paths, concurrency, n, max_seconds) -> dict:
    latencies, statuses, batches = [], [], []
    malformed, dropped, issued = 0, 0, 0
    deadline = time.perf_counter() + max_seconds

    async def connection():
        nonlocal malformed, dropped, issued
        reader, writer = await asyncio.open_connection(host, port)
        while issued < n and time.perf_counter() < deadline:
            path = paths[issued % len(paths)]
            issued += 1
            t = time.perf_counter()
            try:
                status, headers, body = await exchange(reader, writer, host, path)
            except (ConnectionError, asyncio.IncompleteReadError):
                dropped += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            latencies.append(time.perf_counter() - t)
            statuses.append(status)
            try:
                doc = json.loads(body)
                if not isinstance(doc, dict) or ("results" if status == 200 else "error") not in doc:
                    malformed += 1
                elif status == 200:
                    batches.append(doc["timings_ms"].get("batch", 1))
            except ValueError:
                malformed += 1
            if headers.get("connection") == "close":
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = np.array([lat for lat, s in zip(latencies, statuses) if s == 200]) * 1000
    codes = np.array(statuses)
    pct = (lambda q: round(float(np.percentile(ok, q)), 2)) if len(ok) else (lambda q: None)
    return {"concurrency": concurrency, "requests": len(statuses), "ok": int(len(ok)),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "qps": round(len(ok) / wall, 1), "n503": int((codes == 503).sum()),
            "errors": int(((codes != 200) & (codes != 503)).sum()) + dropped,
            "n5xx_not_503": int(((codes >= 500) & (codes != 503)).sum()),
            "malformed_json": malformed, "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
            "seconds": round(wall, 2)}


async def run_mode(args, max_batch: int, paths: list[str]) -> dict:
    server = Server(args.index, args.host, max_batch, args.serve_args)
    try:
        await server.wait_ready()
        await load(args.host, server.port, paths, 4, args.warmup, args.max_seconds)   # warm up
        rss_before = rss_mb(server.proc.pid)
        rows = []
        for c in args.concurrency:
            n = args.requests_at_64 if c >= 64 else args.requests
            rows.append(await load(args.host, server.port, paths, c, n, args.max_seconds))
            print(format_row(max_batch, rows[-1]), flush=True)
        rss_after = rss_mb(server.proc.pid)
    finally:
        code = server.stop()
    return {"max_batch": max_batch, "rows": rows, "rss_before_mb": round(rss_before, 1),
            "rss_after_mb": round(rss_after, 1), "exit_code": code}


HEADER = (f"{'max_batch':>9} {'conc':>4} {'reqs':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
          f"{'QPS':>7} {'503':>5} {'err':>4} {'badJSON':>7} {'batch':>5}")


def format_row(max_batch: int, r: dict) -> str:
    return (f"{max_batch:>9} {r['concurrency']:>4} {r['requests']:>5} {r['p50_ms']:>7} "
            f"{r['p95_ms']:>7} {r['p99_ms']:>7} {r['qps']:>7} {r['n503']:>5} {r['errors']:>4} "
            f"{r['malformed_json']:>7} {r['mean_batch']!s:>5}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, default=Path("index"))
    p.add_argument("--host", default="127.0.0.1", type=loopback)
    p.add_argument("--concurrency", default="1,4,16,64",
                   type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--requests", type=int, default=600, help="per level below 64")
    p.add_argument("--requests-at-64", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=60, help="per level")
    p.add_argument("--modes", default="32,1", help="--max-batch values to compare")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--score", default="elk")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("serve_args", nargs="*", help="extra `cli.py serve` options (after --)")
    args = p.parse_args(argv)
    if not (0 < args.requests <= MAX_REQUESTS and 0 < args.requests_at_64 <= MAX_REQUESTS):
        raise SystemExit(f"error: --requests must be in 1..{MAX_REQUESTS}")
    if not 0 < args.max_seconds <= 600:
        raise SystemExit("error: --max-seconds must be in (0, 600]")
    paths = [f"/api/v1/search?{urllib.parse.urlencode({'q': c, 'k': args.k, 'score': args.score})}"
             for c in captions(args.index)]
    print(f"{len(paths)} distinct caption queries, k={args.k}, score={args.score}, "
          f"client and server on {os.cpu_count()} CPUs\n{HEADER}", flush=True)
    report = {"index": str(args.index), "k": args.k, "score": args.score, "modes": []}
    for mode in (int(m) for m in args.modes.split(",")):
        res = asyncio.run(run_mode(args, mode, paths))
        report["modes"].append(res)
        print(f"  server RSS {res['rss_before_mb']} MB before, {res['rss_after_mb']} MB after; "
              f"exit code {res['exit_code']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
