"""Progress bars for long work (rich), quiet when stderr is not a terminal.

Library code reports progress through `track(...)`; when nobody watches (CI, pipes) the bar is
replaced by a log line every ~10% so logs stay readable.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

logger = logging.getLogger(__name__)


class _LogBar:
    """Fallback for non-interactive runs: a log line at every 10% step."""

    def __init__(self, description: str, total: int):
        self.description, self.total, self.done, self.next_report = description, total, 0, 0.1
        self.start, self.status = time.perf_counter(), ""

    def advance(self, n: int = 1, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        if self.total and self.done / self.total >= self.next_report:
            self.next_report += 0.1
            logger.info("%s %d/%d %s (%.0fs)", self.description, self.done, self.total,
                        self.status, time.perf_counter() - self.start)


class _RichBar:
    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if status is not None:
            self.progress.update(self.task, advance=n, status=status)
        else:
            self.progress.advance(self.task, n)


@contextmanager
def track(description: str, total: int):
    """with track("train epoch 1", n_steps) as bar: bar.advance(1, status="loss 0.31")"""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield _LogBar(description, total)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _RichBar(progress, progress.add_task(description, total=total, status=""))


class StageBars:
    """Adapts a `progress(stage, done, total)` callback (indexer.build's, which knows nothing of
    rich) to one bar per stage: `with StageBars("index") as cb: build_index(..., progress=cb)`."""

    def __init__(self, prefix: str):
        self.prefix, self.stage, self.done = prefix, None, 0
        self._bar_cm, self._bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self._close()
            self.stage, self.done = stage, 0
            self._bar_cm = track(f"{self.prefix} {stage}", total)
            self._bar = self._bar_cm.__enter__()
        self._bar.advance(done - self.done)  # the callback reports totals, bars take steps
        self.done = done

    def _close(self) -> None:
        if self._bar_cm is not None:
            self._bar_cm.__exit__(None, None, None)
            self._bar_cm = self._bar = None

    def __enter__(self) -> "StageBars":
        return self

    def __exit__(self, *exc) -> None:
        self._close()
