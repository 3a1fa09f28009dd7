"""Shard format: ShardWriter round trip, atomic writes, and every validation failure."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import PcmeError
from core.atomic import sha256_file
from indexer.shards import ShardWriter, load_shards, read_shards, validate_shards

D = 8


def _unit(rng, n, dim=D):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_example(out: Path, rows_per_shard: int = 7, seed: int = 0) -> dict:
    """Two modalities interleaved over several shards; returns what was written per modality."""
    rng = np.random.default_rng(seed)
    sent = {m: {"mu": [], "log_var": [], "items": [], "groups": [], "ids": []} for m in ("image", "text")}
    with ShardWriter(out, D, {"checkpoint": "ckpt.pt", "split": "test"}, rows_per_shard) as w:
        for step, (m, n) in enumerate([("image", 5), ("text", 11), ("image", 9), ("text", 3)]):
            mu, lv = _unit(rng, n), rng.normal(-4, 1, (n, D)).astype(np.float32)
            items = [f"{m} {step}.{j} — café ✓" for j in range(n)]
            groups = rng.integers(0, 100, n)
            ids = w.add(m, mu, lv, items, groups)
            for key, val in zip(("mu", "log_var", "items", "groups", "ids"), (mu, lv, items, groups, ids)):
                sent[m][key].append(val)
    return {m: {k: (sum(v, []) if k == "items" else np.concatenate(v)) for k, v in d.items()}
            for m, d in sent.items()}


def test_round_trip_two_modalities_over_several_shards(tmp_path):
    out = tmp_path / "out"
    sent = write_example(out)
    manifest = validate_shards(out)
    assert manifest["counts"] == {"image": 14, "text": 14}
    assert len(manifest["shards"]) == 4 and [s["rows"] for s in manifest["shards"]] == [7, 7, 7, 7]
    assert manifest["producer"]["checkpoint"] == "ckpt.pt"
    for m in ("image", "text"):
        np.testing.assert_array_equal(sent[m]["ids"], np.arange(14))
        got = load_shards(out, m)
        assert got.mu.dtype == np.float32 and got.log_var.dtype == np.float32
        assert got.groups.dtype == np.int64
        np.testing.assert_array_equal(got.ids, np.arange(14))
        np.testing.assert_array_equal(got.mu, sent[m]["mu"])
        np.testing.assert_array_equal(got.log_var, sent[m]["log_var"])
        np.testing.assert_array_equal(got.groups, sent[m]["groups"])
        assert got.items == sent[m]["items"]
    # the files are plain parquet: pyarrow alone reads them
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.schema.field("mu").type == pa.list_(pa.float32(), D)
    assert sum(len(b) for b in read_shards(out, batch_size=3)) == 28


def test_shards_are_written_in_row_groups_a_reader_streams(tmp_path, monkeypatch):
    """A shard file is cut into row groups of ROW_GROUP rows, so a reader decodes one group at
    a time instead of the whole file (the index build's memory); the rows read back unchanged."""
    import indexer.shards as shards

    monkeypatch.setattr(shards, "ROW_GROUP", 3)
    out = tmp_path / "out"
    sent = write_example(out, rows_per_shard=7)
    meta = pq.ParquetFile(out / "shard-00000.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 1]
    got = load_shards(out, "text")
    np.testing.assert_array_equal(got.mu, sent["text"]["mu"])
    assert got.items == sent["text"]["items"]


def test_exception_in_writer_keeps_previous_dir_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out"
    write_example(out, seed=1)
    before = (out / "manifest.json").read_text()
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, D, {}, rows_per_shard=2) as w:
            w.add("image", _unit(rng, 5), np.zeros((5, D)), list("abcde"), np.arange(5))
            raise RuntimeError("boom")
    assert (out / "manifest.json").read_text() == before
    validate_shards(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writer_replaces_existing_shards_only_at_close(tmp_path):
    out = tmp_path / "out"
    write_example(out, seed=1)
    w = ShardWriter(out, D, {}, rows_per_shard=100)
    w.add("text", _unit(np.random.default_rng(3), 4), np.zeros((4, D)), list("abcd"), np.zeros(4, int))
    assert validate_shards(out)["counts"] == {"image": 14, "text": 14}  # old one still there
    w.close()
    assert validate_shards(out)["counts"] == {"image": 0, "text": 4}


def test_writer_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(PcmeError, match="refusing"):
        ShardWriter(tmp_path, D, {})
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("case, match", [
    (dict(modality="audio"), "modality"),
    (dict(mu=np.zeros((3, D + 1), np.float32)), "shape"),
    (dict(log_var=np.zeros((2, D), np.float32)), "shape"),
    (dict(mu=np.full((3, D), np.nan, np.float32)), "NaN"),
    (dict(log_var=np.full((3, D), np.inf)), "NaN or inf"),
    (dict(mu=np.zeros((3, D), np.int64)), "dtype"),
    (dict(items=["a", "b"]), "items"),
    (dict(items=["a", 2, "c"]), "str"),
    (dict(groups=np.zeros(3, np.float32)), "groups"),
])
def test_add_rejects_bad_input(tmp_path, case, match):
    args = dict(modality="image", mu=np.ones((3, D), np.float32), log_var=np.zeros((3, D)),
                items=["a", "b", "c"], groups=np.arange(3))
    args.update(case)
    with ShardWriter(tmp_path / "out", D, {}) as w:
        with pytest.raises(PcmeError, match=match):
            w.add(**args)


# ---- validation: each bad directory gives a PcmeError naming the file ----

def _rewrite(out: Path, shard: int, mutate) -> str:
    """Replace shard `shard` with mutate(table) and fix its manifest entry (sha, rows), so
    validation reaches the content problem rather than stopping at the hash."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    path = out / entry["file"]
    table = mutate(pq.read_table(path))
    pq.write_table(table, path)
    entry.update(sha256=sha256_file(path), rows=len(table))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"]


def _set_column(name, values, typ=None):
    def mutate(table):
        i = table.schema.get_field_index(name)
        return table.set_column(i, name, pa.array(values, typ) if typ is not None else values)
    return mutate


def _vec(a):
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).astype(np.float32)), a.shape[1])


def _poke(column, value):
    def mutate(table):
        a = np.asarray(table.column(column).combine_chunks().flatten()).reshape(len(table), -1).copy()
        a[2, 3] = value
        return _set_column(column, _vec(a))(table)
    return mutate


def _ids(values):
    return _set_column("id", values, pa.int64())


BAD_TABLES = {
    "nan_mu": (_poke("mu", np.nan), "mu has NaN"),
    "inf_mu": (_poke("mu", np.inf), "mu has NaN"),
    "nan_log_var": (_poke("log_var", np.nan), "log_var has NaN"),
    "inf_log_var": (_poke("log_var", np.inf), "log_var has NaN"),
    "neg_inf_log_var": (_poke("log_var", -np.inf), "log_var has NaN"),
    "missing_column": (lambda t: t.drop_columns(["group"]), "missing column 'group'"),
    "wrong_type": (lambda t: t.set_column(0, "id", t.column("id").cast(pa.int32())), "type int32"),
    "wrong_list_size": (lambda t: _set_column("mu", _vec(np.ones((len(t), D + 1))))(t), "dimension 9"),
    "mixed_dims": (lambda t: _set_column("log_var", _vec(np.ones((len(t), 4))))(
        _set_column("mu", _vec(np.ones((len(t), 4))))(t)), "dimension 4, manifest dim is 8"),
    "unknown_modality": (_set_column("modality", ["image"] * 6 + ["audio"], pa.string()), "audio"),
    "null_item": (_set_column("item", ["x"] * 6 + [None], pa.string()), "null"),
}


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_validation_rejects_bad_content(tmp_path, name):
    out = tmp_path / "out"
    write_example(out)
    mutate, match = BAD_TABLES[name]
    file = _rewrite(out, 1, mutate)
    with pytest.raises(PcmeError, match=match) as err:
        validate_shards(out)
    assert file in str(err.value)


def test_validation_rejects_duplicate_and_gapped_ids(tmp_path):
    out = tmp_path / "out"
    write_example(out)  # shard 0: image 0..4, text 0..1
    file = _rewrite(out, 0, _ids([0, 1, 2, 3, 3, 0, 1]))
    with pytest.raises(PcmeError, match="duplicate id 3 for image") as err:
        validate_shards(out)
    assert file in str(err.value)
    _rewrite(out, 0, _ids([0, 1, 2, 3, 4, 0, 5]))
    with pytest.raises(PcmeError, match=f"{file}: ids not contiguous at id 5 for text"):
        validate_shards(out)


def test_validation_rejects_counts_not_matching_manifest(tmp_path):
    out = tmp_path / "out"
    write_example(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["text"] = 15
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PcmeError, match="manifest.json: counts"):
        validate_shards(out)


def test_validation_rejects_changed_truncated_missing_files(tmp_path):
    out = tmp_path / "out"
    write_example(out)
    path = out / "shard-00002.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PcmeError, match="shard-00002.parquet: sha256 does not match"):
        validate_shards(out)
    _rewrite_sha_only(out, 2)  # same truncated bytes, hash now agrees: the parquet reader must fail
    with pytest.raises(PcmeError, match="shard-00002.parquet: unreadable parquet"):
        validate_shards(out)
    path.unlink()
    with pytest.raises(PcmeError, match="shard-00002.parquet: shard file listed in the manifest is missing"):
        validate_shards(out)


def _rewrite_sha_only(out: Path, shard: int) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][shard]["sha256"] = sha256_file(out / manifest["shards"][shard]["file"])
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_validation_rejects_missing_empty_and_unreadable_dirs(tmp_path):
    with pytest.raises(PcmeError, match="nope: shards directory does not exist"):
        validate_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PcmeError, match="empty.manifest.json: no manifest"):
        validate_shards(tmp_path / "empty")
    out = tmp_path / "out"
    write_example(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PcmeError, match="manifest.json: manifest unreadable"):
        validate_shards(out)
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "index"}))
    with pytest.raises(PcmeError, match="not a shards manifest"):
        validate_shards(out)


@pytest.mark.parametrize("exchange_available", [True, False])
def test_commit_swaps_directories_with_or_without_renameat2(tmp_path, monkeypatch, exchange_available):
    from core import atomic as manifest_mod
    if not exchange_available:
        monkeypatch.setattr(manifest_mod, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_example(out, seed=1)
    write_example(out, rows_per_shard=100, seed=2)
    assert [s["rows"] for s in validate_shards(out)["shards"]] == [28]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old / .tmp leftovers
