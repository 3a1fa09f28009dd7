"""Bad input that needs no trained model: shard directories, index directories and configs.
Every case goes through the CLI and checks exit code 2, one `error:` line naming the file or
argument, no traceback, and that the last good index (the `good` fixture) stayed intact.
kill -9 during `index` is in test_index_lifecycle.py.

Each case records its message with `record_property("message", ...)`, so
`pytest --junitxml=x.xml` gives the rows of the bad-input table.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from core.atomic import sha256_file
from indexer.reader import IndexReader
from tests.helpers import one_error_line, unit, write_shards

runner = CliRunner()


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
