"""How this project's own commands are spelled in hints and errors ("next: ...", "resume
with: ...", "run: ... first"), so a pasted hint runs as shown: the interpreter that is running
now (the venv's python, which has the dependencies; bare `python` may not) and every argument
quoted for a POSIX shell (paths with spaces)."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def python_spelling() -> str:
    """The running interpreter, relative to the working directory when it lives below it
    (`.venv/bin/python`), else its absolute path."""
    exe = Path(sys.executable or "python3")
    try:
        rel = exe.relative_to(Path.cwd())
    except ValueError:
        return str(exe)
    return str(rel) if rel.parts and rel.parts[0] != ".." else str(exe)


def cli_command(*args: object) -> str:
    """`<python> cli.py ARGS...`, shell-quoted, e.g. cli_command("index", "--shards", "out dir")
    -> ".venv/bin/python cli.py index --shards 'out dir'"."""
    words = [python_spelling(), "cli.py", *(os.fspath(a) if isinstance(a, Path) else str(a)
                                            for a in args)]
    return shlex.join(words)
