"""Atomic file output shared by every stage: sha256, JSON written in one piece, directories
that appear all at once, and single files replaced in one rename.

A directory a stage writes is built in a temporary sibling `.<name>.tmp-<pid>-<start>` and
swapped in only when complete, so a crash or an exception at any point leaves the previous output
intact. `<start>` is the owner's process start time: a pid alone is reused by the kernel, so
"pid alive" could keep a killed run's temp dir forever, or mistake a stranger for its owner.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from core.errors import PcmeError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB shards never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | Path, obj: dict) -> Path:
    """Write JSON via a temp file + rename, so a reader never sees half a manifest."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary sibling of `path`, then rename it over `path`: a reader
    (or a crash) never sees half a file. Used for checkpoints, JSON and plots."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, option: str, inside: bool = False) -> Path:
    """Fail now, with one line naming `option`, when `path` cannot be written: before a command
    does minutes of work, not after. Outputs are written as temporary siblings renamed into
    place, so the folder that must accept new files is the nearest existing ancestor of
    `path`'s parent (and `path` itself when `inside`: run folders are written in place).
    Probed by creating and removing a file, which sees read-only mounts, permissions and ACLs."""
    path = Path(path)
    if path.exists() and inside and not path.is_dir():
        raise PcmeError(f"{option} {path}: exists and is not a directory")
    folder = path if inside and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PcmeError(f"{option} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pcme-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PcmeError(f"{option} {path}: cannot write in {folder} ({e.strerror})") from None
    return path


def manifest_kind(directory: Path) -> str | None:
    """The `kind` recorded in directory/manifest.json, or None when there is none to read."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    # scenes caches written before manifests carried a kind name their dataset instead
    return manifest.get("kind", manifest.get("dataset"))


class AtomicDir:
    """A temp sibling of `out_dir` that replaces `out_dir` on `commit()`.

    `kind` guards against clobbering the wrong folder: an existing `out_dir` is replaced only
    when it is empty or holds a manifest of that kind (so `--out ~` cannot wipe a home dir).
    Use as a context manager: commit on success, remove the temp dir on exception.
    """

    def __init__(self, out_dir: Path, kind: str):
        self.out_dir = Path(out_dir).absolute()
        self.kind = kind
        self._check_replaceable()
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{_owner_tag(os.getpid())}"
        if self.tmp.exists():  # left by an earlier AtomicDir of this very process
            shutil.rmtree(self.tmp)
        self._remove_stale_temps()
        self.tmp.mkdir(parents=True)
        self.done = False

    def _remove_stale_temps(self) -> None:
        """Delete temp dirs of earlier runs into the same out_dir whose process is gone (killed
        with -9, power loss): they are partial builds nobody will finish. A dir whose owner
        still runs is left alone, since another build may be going on; `.old-*` dirs are never
        touched (after a kill between two renames that is the only complete copy)."""
        if not self.out_dir.parent.is_dir():
            return
        prefix = f".{self.out_dir.name}.tmp-"
        for path in self.out_dir.parent.glob(f"{prefix}*"):
            if path.is_dir() and _owner_gone(path.name[len(prefix):]):
                logger.info("removing %s, left by an interrupted run", path)
                shutil.rmtree(path, ignore_errors=True)

    def _check_replaceable(self) -> None:
        out = self.out_dir
        if not out.exists():
            return
        if not out.is_dir():
            raise PcmeError(f"{out}: exists and is not a directory; refusing to replace it")
        if not any(out.iterdir()):
            return
        if manifest_kind(out) != self.kind:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise PcmeError(f"{out}: exists and is not {article} {self.kind} directory "
                            f"(no valid {MANIFEST}); refusing to replace it") from None

    def commit(self) -> Path:
        self._check_replaceable()  # someone may have put something there meanwhile
        if not self.out_dir.exists():
            os.rename(self.tmp, self.out_dir)
        elif _exchange(self.tmp, self.out_dir):
            shutil.rmtree(self.tmp)  # tmp now holds the old version
        else:
            self._swap_by_two_renames()
        _fsync_dir(self.out_dir.parent)
        self.done = True
        logger.info("wrote %s", self.out_dir)
        return self.out_dir

    def _swap_by_two_renames(self) -> None:
        # Fallback where renameat2 is missing: a kill between the two renames leaves the old
        # version under `.<name>.old-<pid>`, still complete, and never a half-written out_dir.
        old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(self.out_dir, old)
        os.rename(self.tmp, self.out_dir)
        shutil.rmtree(old)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.done = True

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or
    None when the process does not exist or /proc is not there (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_tag(pid: int) -> str:
    """`<pid>-<start time>` where /proc knows the start time, else `<pid>`."""
    start = _start_time(pid)
    return f"{pid}-{start}" if start is not None else str(pid)


def _owner_gone(tag: str) -> bool:
    """True when the process that made a temp dir tagged `tag` has ended. With a start time
    the owner is gone when its pid is dead or now belongs to a process that started at another
    time (pid reuse); a bare pid (no /proc) can only be checked for being alive. Tags of any
    other form are not ours to judge: False."""
    pid, _, start = tag.partition("-")
    if not pid.isdigit() or not (start == "" or start.isdigit()):
        return False
    if start and Path("/proc/self/stat").exists():
        return _start_time(int(pid)) != start
    return not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE): there is no instant at
    which `b` is missing. Returns False where the call is unavailable (other OS, old libc,
    filesystem without support) so the caller can fall back to two renames."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        logger.debug("renameat2 failed (errno %d); falling back to two renames", ctypes.get_errno())
    return rc == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
