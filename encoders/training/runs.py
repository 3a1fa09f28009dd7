"""Run folders: one training run per folder, one writer at a time, never replaced silently.

`train` writes in place into its run folder (`--out`, default runs/latest): checkpoint.pt,
last.pt, log.jsonl, eval.json, and here config.json (the resolved options, which is what
`--resume` reads back) and manifest.json (kind "run": status, pid, times, the resume command,
the checkpoint's sha256). A folder that already holds a run is refused unless the user says
what to do with it: `--resume` continues it, `--force` replaces it. This is the convention of
tools that keep one named run folder (rather than a new folder per run) because the README's
quick start and the index manifest name `runs/latest/checkpoint.pt`.

A second `train` into a folder in use fails at once: the writer holds an exclusive flock on
`<out>/.lock` (released by the kernel when the process dies, even by kill -9) and writes its
pid there for the message.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict
from pathlib import Path

from core.atomic import MANIFEST, check_writable, sha256_file, utc_now, write_json
from core.commands import cli_command
from core.errors import PcmeError
from encoders.training.config import TrainConfig

logger = logging.getLogger(__name__)

LOCK = ".lock"
CONFIG = "config.json"
RUN_FILES = ("checkpoint.pt", "last.pt", "log.jsonl", "eval.json", CONFIG, MANIFEST)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `resume` is the command that continues the run."""

    def __init__(self, resume: str):
        super().__init__(resume)
        self.resume = resume


def run_state(out: Path) -> str | None:
    """What `out` holds: "finished", "interrupted" (last.pt, no checkpoint.pt), "incomplete"
    (a log or manifest but nothing to resume from), or None (no run)."""
    if (out / "checkpoint.pt").is_file():
        return "finished"
    if (out / "last.pt").is_file():
        return "interrupted"
    if any((out / name).exists() for name in ("log.jsonl", "eval.json", MANIFEST)):
        return "incomplete"
    return None


class RunLock:
    """Exclusive, non-blocking flock on <out>/.lock for the life of a training run."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.file = None

    def __enter__(self) -> "RunLock":
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise PcmeError(f"--out {self.path.parent}: another train (pid {owner}) is writing "
                            f"this run folder; wait for it to end or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()  # closing releases the flock; the file stays (it may be reused)


def _claim(out: Path, resume: bool, force: bool) -> str:
    """Check what `out` holds against --resume/--force; clear it for a fresh run. Returns
    "resume" or "start"."""
    state = run_state(out)
    if resume:
        if state not in ("interrupted", "finished"):
            raise PcmeError(f"--resume: {out} holds no run to continue (no last.pt); "
                            f"train without --resume")
        return "resume"
    if state and not force:
        what = {"finished": "a finished run (checkpoint.pt)",
                "interrupted": "an interrupted run (last.pt)",
                "incomplete": "an incomplete run (log.jsonl, nothing to resume from)"}[state]
        raise PcmeError(f"--out {out}: holds {what}; add --resume to continue it, --force to "
                        f"replace it, or choose another --out")
    for name in RUN_FILES:  # --force or an empty folder: the new run starts with a fresh log
        (out / name).unlink(missing_ok=True)
    return "start"


def run_training(cfg: TrainConfig, resume: bool = False, force: bool = False) -> dict:
    """encoders.training.train.train(cfg, resume) inside a claimed, locked, manifested run
    folder. Every output location is checked for writing before any work."""
    from encoders.training.train import train

    out = Path(cfg.out)
    check_writable(out, "--out", inside=True)
    if cfg.export:
        check_writable(cfg.shards, "--shards")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        event = _claim(out, resume, force)
        write_json(out / CONFIG, asdict(cfg))
        manifest = _read_manifest(out) if event == "resume" else {}
        manifest.update({
            "kind": "run", "schema_version": 1, "status": "running", "pid": os.getpid(),
            "host": socket.gethostname(), "updated": utc_now(),
            "resume_command": cli_command("train", "--config", out / CONFIG, "--resume"),
            "config": asdict(cfg)})
        manifest.setdefault("started", manifest["updated"])
        write_json(out / MANIFEST, manifest)
        with open(out / "log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"event": event, "time": manifest["updated"],
                                  "pid": os.getpid()}) + "\n")
        try:
            result = train(cfg, resume)
        except BaseException as e:
            if event == "start" and not (out / "last.pt").exists():
                _remove_run(out, created)  # stopped before any progress: nothing to keep
                raise
            if isinstance(e, KeyboardInterrupt):
                _finish(out, manifest, "interrupted")
                raise RunInterrupted(manifest["resume_command"]) from None
            _finish(out, manifest, "failed")
            raise
        ckpt = out / "checkpoint.pt"
        _finish(out, manifest, "finished", checkpoint=str(ckpt),
                checkpoint_sha256=sha256_file(ckpt), shards=result.get("shards"),
                train_s=result.get("train_s"))
    return result


def _remove_run(out: Path, created: bool) -> None:
    """Undo a run that failed (a bad flag, a missing dataset) before saving anything to resume
    from, so the next attempt is not refused for a run that never was."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if created:
        (out / LOCK).unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:
            pass


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _finish(out: Path, manifest: dict, status: str, **facts) -> None:
    manifest.update(status=status, updated=utc_now(), **facts)
    try:
        write_json(out / MANIFEST, manifest)
    except OSError as e:  # never hide the real outcome behind a bookkeeping failure
        logger.warning("could not update %s: %s", out / MANIFEST, e)
