"""Test data and checks shared by several test modules: tiny datasets in their real formats,
synthetic shard sets, the one-line-error check of the bad-input tests, and waits on events
of a child process (a file, a log line) for the kill -9 tests."""
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.shards import ShardWriter

D = 8  # dimension of the synthetic shards


def write_image(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


def write_cub(root, n_classes=4, per_class=2, class_files=None):
    for c in range(1, n_classes + 1):
        cls = f"{c:03d}.Bird_{c}"
        for j in range(per_class):
            write_image(root / "CUB_200_2011" / "images" / cls / f"Bird_{c}_{j}.jpg")
            text = root / "text_c10" / cls / f"Bird_{c}_{j}.txt"
            text.parent.mkdir(parents=True, exist_ok=True)
            text.write_text("".join(f"bird {c} image {j} caption {k}\n" for k in range(10)) + "\n")
    for name, classes in (class_files or {}).items():
        (root / name).write_text("".join(f"{c}\n" for c in classes))


def unit(rng, n, dim=D):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shards(out: Path, n: int, dim: int = D, seed: int = 0, rows_per_shard: int = 100_000) -> Path:
    """n images and n captions (one per image) in random clusters; groups = image ids."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, dim, {"checkpoint": "nowhere.pt"}, rows_per_shard) as w:
        for m in ("image", "text"):
            for start in range(0, n, 50_000):
                k = min(50_000, n - start)
                w.add(m, unit(rng, k, dim), rng.normal(-4, 1, (k, dim)).astype(np.float32),
                      [f"{m} {start + j}" for j in range(k)], np.arange(start, start + k))
    return out


def one_error_line(res, record_property, *needles) -> str:
    """exit 2, exactly one `error:` line holding every needle, and no traceback."""
    out = res.output
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    record_property("message", lines[0] if lines else out.strip()[-300:])
    record_property("exit_code", res.exit_code)
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, out
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def wait_for(event, proc, timeout: float, what: str, poll: float = 0.05):
    """Poll `event()` until it returns something truthy (returned), while `proc` (a Popen) runs.
    Fails when the process exits first or `timeout` seconds pass: a wait on an event, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        found = event()
        if found:
            return found
        assert proc.poll() is None, f"process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll)


class StderrLines:
    """Reads a child's stderr (text mode) on a thread, so the pipe never fills up, and lets a
    test block until the first line holding a needle arrives (no polling)."""

    def __init__(self, proc):
        self.proc, self.lines, self.closed = proc, [], False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        def seen():
            return next((l for l in self.lines if needle in l), None) or self.closed
        with self._cond:
            found = self._cond.wait_for(seen, timeout)
        assert isinstance(found, str), (f"no stderr line with {needle!r} within {timeout} s "
                                        f"(stream closed: {self.closed}); last lines: {self.lines[-5:]}")
        return found


def kill_9_when(proc, event):
    """Wait for `event()` (it returns what the test needs, and raises when the event does not
    come), then kill -9 `proc` while it still runs; the process never outlives the call."""
    import os
    import signal

    try:
        found = event()
        assert proc.poll() is None, "the process finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return found
