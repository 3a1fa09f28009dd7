"""Index lifecycle without a model: `info` on an index, verbose logging, kill -9 during
`index` (the previous index survives), temp-dir cleanup, and progress bars of a build."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from indexer.info import format_info, index_info
from core.atomic import sha256_file
from indexer.reader import IndexReader
from tests.helpers import D, StderrLines, kill_9_when, one_error_line, unit, write_shards

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --- info -------------------------------------------------------------------------------------

def test_index_info_matches_the_directory(good):
    info = index_info(good / "index")
    manifest = json.loads((good / "index" / "manifest.json").read_text())
    assert info["counts"] == {"image": 300, "text": 300} and info["dim"] == D
    assert info["factory"] == manifest["factory"] and info["nprobe"] == manifest["nprobe"]
    on_disk = {str(p.relative_to(good / "index")): p.stat().st_size
               for p in (good / "index").rglob("*") if p.is_file()}
    assert info["files"] == on_disk and info["total_bytes"] == sum(on_disk.values())
    assert info["checkpoint"] == {"path": "nowhere.pt", "sha256": None, "exists": False, "matches": None}
    text = "\n".join(format_info(info))
    assert "300 vectors" in text and "missing" in text and "total" in text
    assert f"store: format {manifest['store']['format']} " in text


def test_index_info_bad_directories(good, tmp_path):
    from core.errors import PcmeError
    with pytest.raises(PcmeError, match="does not exist"):
        index_info(tmp_path / "nope")
    broken = tmp_path / "index"
    shutil.copytree(good / "index", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["counts"] = "lots"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PcmeError, match=r"manifest.json: malformed index manifest \(counts"):
        index_info(broken)


def test_cli_info(good, record_property):
    res = runner.invoke(app, ["info", str(good / "index")])
    assert res.exit_code == 0, res.output
    assert "300 vectors" in res.output and "total" in res.output
    res = runner.invoke(app, ["info", str(good / "nope")])
    one_error_line(res, record_property, "nope", "does not exist")


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_flag_turns_on_debug_logging(good, flag):
    """A fresh process: logging is configured once per process."""
    argv = [sys.executable, "cli.py", "info", str(good / "index")]
    quiet = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    loud = subprocess.run(argv + [flag], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert "DEBUG indexer.info" not in quiet.stderr and "DEBUG indexer.info" in loud.stderr


# --- kill -9 during `index` ---------------------------------------------------------------

@pytest.mark.slow
def test_kill_during_index_keeps_the_previous_index(good, tmp_path):
    """SIGKILL while a long build runs into the same --out: the old index is untouched and usable,
    nothing partial sits at --out, and the next build clears the dead run's temp dir."""
    big = write_shards(tmp_path / "big", 200_000, dim=32, seed=3)
    out = tmp_path / "index"
    shutil.copytree(good / "index", out)
    sha = sha256_file(out / "manifest.json")
    proc = subprocess.Popen([sys.executable, "cli.py", "index", "--shards", str(big), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the add stage's first progress line: rows are being written into the temp dir
    kill_9_when(proc, lambda: StderrLines(proc).wait_for("index add ", timeout=120))
    assert sha256_file(out / "manifest.json") == sha
    with IndexReader.open(out) as reader:  # usable: opens, searches, fetches
        assert reader.count("image") == 300
        ids, _ = reader.search("image", unit(np.random.default_rng(4), 1), 3)
        assert reader.fetch_log_var("image", ids[0]).shape == (3, D)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("index")) == ["index"]
    # the dead run's temp dir is all it left; the next build into the same --out removes it
    temps = list(tmp_path.glob(".index.tmp-*"))
    assert len(temps) == 1 and (temps[0] / "store.lmdb").exists()  # killed mid-build
    res = runner.invoke(app, ["index", "--shards", str(good / "out"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".index.tmp-*"))


def _start_time(pid) -> str:
    """Field 22 of /proc/<pid>/stat, read here independently of core.atomic."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_atomic_dir_removes_only_dead_runs_temp_dirs(tmp_path):
    """A temp dir belongs to (pid, start time): it is kept only while that very process runs.
    A reused pid (alive, but started at another time) does not keep a dead run's dir."""
    from core.atomic import AtomicDir
    child = "import os; print(os.getpid(), open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])"
    dead_pid, dead_start = subprocess.run([sys.executable, "-c", child], capture_output=True,
                                          text=True, check=True).stdout.split()
    me, init = os.getpid(), 1
    live = [f"{init}-{_start_time(init)}",      # another build running: left alone
            "1"]                                # a bare pid (no /proc) that is alive: left alone
    stale = [f"{dead_pid}-{dead_start}",        # its process exited
             f"{me}-{int(_start_time(me)) + 1}",  # pid alive, but a younger process owns it now
             f"{init}-{int(_start_time(init)) + 7}",
             str(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)]  # bare pid, never alive
    for tag in live + stale:
        (tmp_path / f".index.tmp-{tag}").mkdir()
    (tmp_path / ".index.old-123").mkdir()  # the only complete copy after some crashes: kept
    (tmp_path / ".index.tmp-notapid").mkdir()  # not a temp dir of ours: kept
    with AtomicDir(tmp_path / "index", kind="index") as tmp:
        assert tmp.name == f".index.tmp-{me}-{_start_time(me)}"
        (tmp / "manifest.json").write_text(json.dumps({"kind": "index", "schema_version": 1}))
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = [".index.old-123", ".index.tmp-notapid"] + [f".index.tmp-{t}" for t in live] + ["index"]
    assert left == sorted(expected)


def test_stage_bars_follow_the_index_build(good, tmp_path, caplog):
    """The adapter the CLI can hand to build_index: one bar per stage, advanced to its total
    (outside a terminal each bar logs every 10%, so the last line of each stage says n/n)."""
    import logging
    from core.progress import StageBars
    from indexer.build import build_index
    with caplog.at_level(logging.INFO, logger="core.progress"), StageBars("index") as bars:
        build_index(good / "out", tmp_path / "index", progress=bars)
    lines = [r.getMessage() for r in caplog.records if r.name == "core.progress"]
    assert any(l.startswith("index validate 600/600") for l in lines), lines
    assert any(l.startswith("index add 600/600") for l in lines), lines
