"""Bad input that needs no trained model: shard directories, index directories, configs, and
kill -9 during `index`. Every case goes through the CLI and checks exit code 2, one `error:` line
naming the file or argument, no traceback, and that the last good index stayed intact.

Each case records its message with `record_property("message", ...)`, so
`pytest --junitxml=x.xml` gives the rows of the bad-input table.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from engine.info import format_info, index_info
from indexer.manifest import sha256_file
from indexer.reader import IndexReader
from indexer.shards import ShardWriter

REPO = Path(__file__).resolve().parents[1]
D = 8
runner = CliRunner()


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


def tamper(shard_dir: Path, edit, rehash: bool = True) -> Path:
    """Rewrite shard-00000 through `edit(table) -> table`; with `rehash` the manifest is updated
    to the new file, so the check under test is the one that fires, not the sha256 one."""
    path = shard_dir / "shard-00000.parquet"
    if edit is not None:
        pq.write_table(edit(pq.read_table(path)), path)
    if rehash:
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        manifest["shards"][0]["sha256"] = sha256_file(path)
        (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


def with_values(column: str, row: int, value: float):
    def edit(table):
        vec = np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)
        vec[row, 1] = value
        arr = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), vec.shape[1])
        return table.set_column(table.schema.get_field_index(column), column, arr)
    return edit


def rename_column(table):
    return table.rename_columns(["id", "modality", "mean", "log_var", "item", "group"])


def other_dim(table):
    n = len(table)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 4, np.float32)), 4)
    return table.set_column(table.schema.get_field_index("mu"), "mu", arr)


def duplicate_id(table):
    ids = table.column("id").to_numpy().copy()
    ids[3] = ids[2]
    return table.set_column(0, "id", pa.array(ids))


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


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small shard set and the index built from it: the 'last good output' every case keeps."""
    root = tmp_path_factory.mktemp("bad")
    write_shards(root / "out", 300)
    res = runner.invoke(app, ["index", "--shards", str(root / "out"), "--out", str(root / "index")])
    assert res.exit_code == 0, res.output
    return root


def index_intact(root: Path, sha_before: str) -> None:
    assert sha256_file(root / "index" / "manifest.json") == sha_before
    with IndexReader.open(root / "index") as reader:
        assert reader.count("image") == 300
        ids, _ = reader.search("image", unit(np.random.default_rng(1), 1), 5)
        assert ids.shape == (1, 5)
    assert not list(root.glob(".index.tmp-*"))


# --- shard directories: `index --shards BAD --out index/` ------------------------------------

SHARD_CASES = {
    "missing directory": (None, "does not exist"),
    "empty directory": ("empty", "no manifest"),
    "wrong schema": (lambda d: tamper(d, rename_column), "missing column 'mu'"),
    "mixed dimensions": (lambda d: tamper(d, other_dim), "dimension 4, manifest dim is 8"),
    "NaN in mu": (lambda d: tamper(d, with_values("mu", 5, np.nan)), "mu has NaN or inf"),
    "inf in mu": (lambda d: tamper(d, with_values("mu", 5, np.inf)), "mu has NaN or inf"),
    "NaN in log_var": (lambda d: tamper(d, with_values("log_var", 5, np.nan)), "log_var has NaN or inf"),
    "+inf in log_var": (lambda d: tamper(d, with_values("log_var", 5, np.inf)), "log_var has NaN or inf"),
    "-inf in log_var": (lambda d: tamper(d, with_values("log_var", 5, -np.inf)), "log_var has NaN or inf"),
    "duplicate ids": (lambda d: tamper(d, duplicate_id), "duplicate id 2"),
    "truncated parquet": ("truncate", "unreadable parquet"),
    "shard changed after writing": ("changed", "sha256 does not match"),
    "shard file missing": ("deleted", "listed in the manifest is missing"),
    "manifest not JSON": ("badjson", "manifest unreadable"),
}


def _make_bad_shards(tmp_path: Path, how) -> Path:
    bad = tmp_path / "shards"
    if how is None:
        return bad
    if how == "empty":
        bad.mkdir()
        return bad
    write_shards(bad, 300, seed=2)
    first = bad / "shard-00000.parquet"
    if callable(how):
        how(bad)
    elif how in ("truncate", "changed"):
        data = first.read_bytes()
        first.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-9] + b"X" + data[-8:])
        if how == "truncate":
            tamper(bad, None)
    elif how == "deleted":
        first.unlink()
    elif how == "badjson":
        (bad / "manifest.json").write_text("{not json")
    return bad


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_shards(good, tmp_path, case, record_property):
    how, needle = SHARD_CASES[case]
    bad = _make_bad_shards(tmp_path, how)
    sha = sha256_file(good / "index" / "manifest.json")
    res = runner.invoke(app, ["index", "--shards", str(bad), "--out", str(good / "index")])
    line = one_error_line(res, record_property, needle)
    assert str(bad) in line  # names the directory or the file in it
    index_intact(good, sha)


def test_index_refuses_to_replace_a_foreign_directory(good, tmp_path, record_property):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["index", "--shards", str(good / "out"), "--out", str(precious)])
    one_error_line(res, record_property, str(precious), "refusing to replace")
    assert (precious / "notes.txt").read_text() == "keep me"


# --- index directories, the parts that need no model ----------------------------------------

def test_query_index_without_manifest(good, tmp_path, record_property):
    broken = tmp_path / "index"
    shutil.copytree(good / "index", broken)
    (broken / "manifest.json").unlink()
    res = runner.invoke(app, ["query", "a dog", "--index", str(broken)])
    one_error_line(res, record_property, str(broken / "manifest.json"), "no manifest")


def test_query_missing_index_directory(tmp_path, record_property):
    res = runner.invoke(app, ["query", "a dog", "--index", str(tmp_path / "nope")])
    one_error_line(res, record_property, str(tmp_path / "nope"), "does not exist")


def test_query_truncated_faiss_file(good, tmp_path, record_property):
    broken = tmp_path / "index"
    shutil.copytree(good / "index", broken)
    faiss_file = broken / "image.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    res = runner.invoke(app, ["query", "a dog", "--index", str(broken)])
    one_error_line(res, record_property, str(faiss_file), "FAISS")


def test_query_missing_lmdb_store(good, tmp_path, record_property):
    broken = tmp_path / "index"
    shutil.copytree(good / "index", broken)
    shutil.rmtree(broken / "store.lmdb")
    res = runner.invoke(app, ["query", "a dog", "--index", str(broken)])
    one_error_line(res, record_property, "store.lmdb", "missing")


def test_query_malformed_manifest(good, tmp_path, record_property):
    broken = tmp_path / "index"
    shutil.copytree(good / "index", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["store"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["query", "a dog", "--index", str(broken)])
    one_error_line(res, record_property, str(broken / "manifest.json"), "malformed")


# --- configs: `train --config BAD` ------------------------------------------------------------

CONFIG_CASES = {
    "unknown key": ("epocs = 3\n", "unknown key(s) epocs"),
    "unknown model key": ("[model]\nembed = 3\n", "unknown key(s) embed"),
    "string for a number": ('epochs = "three"\n', "'epochs' must be a number"),
    "fraction for a whole number": ("batch_size = 2.5\n", "'batch_size' must be a whole number"),
    "number for a flag": ("amp = 1\n", "'amp' must be true or false"),
    "number for a string": ("loss = 3\n", "'loss' must be a string"),
    "model not a table": ("model = 3\n", "'model' must be a table"),
    "layers not a list": ('[model]\nresnet_layers = "big"\n', "'resnet_layers' must be a list"),
    "zero batch size": ("batch_size = 0\n", "'batch_size' must be >= 1"),
    "negative epochs": ("epochs = -1\n", "'epochs' must be >= 0"),
    "unparsable TOML": ("epochs = \n", "cannot parse"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(tmp_path, case, record_property):
    text, needle = CONFIG_CASES[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    res = runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                              "--root", str(tmp_path / "data"), "--device", "cpu"])
    one_error_line(res, record_property, str(cfg), needle)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # failed before work


@pytest.mark.parametrize("flag,value,needles", [
    ("--batch-size", "0", ("batch_size", ">= 1")),
    ("--loss", "hinge", ("loss 'hinge' is unknown", "pcme")),
    ("--data", "imagenet", ("data 'imagenet' is unknown", "scenes")),
    ("--device", "tpu", ("--device tpu",)),
])
def test_bad_train_flag(tmp_path, flag, value, needles, record_property):
    """Checked before any data is generated or decoded (the data folder is never created)."""
    res = runner.invoke(app, ["train", flag, value, "--out", str(tmp_path / "run"),
                              "--root", str(tmp_path / "data"), "--device", "cpu", flag, value])
    one_error_line(res, record_property, *needles)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


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


def test_index_info_bad_directories(good, tmp_path):
    from engine.errors import PcmeError
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
    assert "DEBUG engine.info" not in quiet.stderr and "DEBUG engine.info" in loud.stderr


# --- kill -9 during `index` ---------------------------------------------------------------

def test_kill_during_index_keeps_the_previous_index(good, tmp_path):
    """SIGKILL while a long build runs into the same --out: the old index is untouched and usable,
    nothing partial sits at --out, and the next build clears the dead run's temp dir."""
    big = write_shards(tmp_path / "big", 200_000, dim=32, seed=3)
    out = tmp_path / "index"
    shutil.copytree(good / "index", out)
    sha = sha256_file(out / "manifest.json")
    proc = subprocess.Popen([sys.executable, "cli.py", "index", "--shards", str(big), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".index.tmp-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "index finished before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)  # let it write into the temp dir
        assert proc.poll() is None, "index finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert sha256_file(out / "manifest.json") == sha
    with IndexReader.open(out) as reader:  # usable: opens, searches, fetches
        assert reader.count("image") == 300
        ids, _ = reader.search("image", unit(np.random.default_rng(4), 1), 3)
        assert reader.fetch_log_var("image", ids[0]).shape == (3, D)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("index")) == ["index"]
    # the dead run's temp dir is all it left; the next build into the same --out removes it
    assert len(list(tmp_path.glob(".index.tmp-*"))) == 1
    res = runner.invoke(app, ["index", "--shards", str(good / "out"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".index.tmp-*"))


def test_atomic_dir_removes_only_dead_runs_temp_dirs(tmp_path):
    from indexer.manifest import AtomicDir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for pid in (dead, "1"):  # pid 1 is alive: maybe another build, left alone
        (tmp_path / f".index.tmp-{pid}").mkdir()
    (tmp_path / ".index.old-123").mkdir()  # the only complete copy after some crashes: kept
    with AtomicDir(tmp_path / "index", kind="index") as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"kind": "index", "schema_version": 1}))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".index.old-123", ".index.tmp-1", "index"]


def test_stage_bars_follow_the_index_build(good, tmp_path, caplog):
    """The adapter the CLI can hand to build_index: one bar per stage, advanced to its total
    (outside a terminal each bar logs every 10%, so the last line of each stage says n/n)."""
    import logging
    from encoders.progress import StageBars
    from indexer.build import build_index
    with caplog.at_level(logging.INFO, logger="encoders.progress"), StageBars("index") as bars:
        build_index(good / "out", tmp_path / "index", progress=bars)
    lines = [r.getMessage() for r in caplog.records if r.name == "encoders.progress"]
    assert any(l.startswith("index validate 600/600") for l in lines), lines
    assert any(l.startswith("index add 600/600") for l in lines), lines
