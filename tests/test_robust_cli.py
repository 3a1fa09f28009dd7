"""Robustness with a trained tiny index: bad queries, a changed or missing checkpoint, a damaged
LMDB store, odd images, k out of range, several query processes at once, `info`, `--show`, and
every command's --help. One module-scoped fixture trains once (tiny config, ~45 s on 2 cores).

Cases record `message`/`exit_code` with record_property (see tests/helpers.py: one_error_line).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli import app
from engine.contact_sheet import contact_sheet
from core.errors import PcmeError
from indexer.info import index_info
from cli import open_engine
from core.atomic import sha256_file

from tests.helpers import one_error_line

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def scene_image(trained) -> Path:
    return trained / "data" / "scenes" / "test" / "images" / "000002.png"


def query(root, *args, index=None):
    return runner.invoke(app, ["query", *args, "--index", str(index or root / "index")])


def copy_index(trained, tmp_path, checkpoint_edit=None) -> Path:
    """A copy of the index whose manifest points at a private copy of the checkpoint, so a case
    can delete or change that copy without touching the shared fixture."""
    index = tmp_path / "index"
    shutil.copytree(trained / "index", index)
    ckpt = tmp_path / "checkpoint.pt"
    shutil.copy(trained / "run" / "checkpoint.pt", ckpt)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["producer"]["checkpoint"] = str(ckpt)
    (index / "manifest.json").write_text(json.dumps(manifest))
    if checkpoint_edit:
        checkpoint_edit(ckpt)
    return index


# --- index directory: checkpoint and store ----------------------------------------------------

def test_checkpoint_missing(trained, tmp_path, record_property):
    index = copy_index(trained, tmp_path, lambda p: p.unlink())
    one_error_line(query(trained, "a dog", index=index), record_property,
                   str(tmp_path / "checkpoint.pt"), "file not found")


def test_checkpoint_changed_since_indexing(trained, tmp_path, record_property):
    index = copy_index(trained, tmp_path, lambda p: p.write_bytes(p.read_bytes() + b"\0"))
    one_error_line(query(trained, "a dog", index=index), record_property,
                   str(tmp_path / "checkpoint.pt"), "sha256 differs")
    info = index_info(index)
    assert info["checkpoint"]["exists"] and info["checkpoint"]["matches"] is False


def test_lmdb_missing_keys(trained, tmp_path, record_property):
    index = copy_index(trained, tmp_path)
    env = lmdb.open(str(index / "store.lmdb"), max_dbs=8, subdir=True)
    with env.begin(write=True) as txn:  # drop every image's row: any hit lacks its μ and σ
        db = env.open_db(b"image.vec", txn=txn)
        txn.drop(db, delete=False)
    env.close()
    line = one_error_line(query(trained, "a dog", index=index), record_property,
                          "store.lmdb", "image.vec has no entry for id")
    assert str(index) in line


# --- text queries -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,needles", [
    ("", ("query", "empty")),
    ("   \t ", ("query", "empty")),
    ("qqqzzzxxw zzqqxxwv", ("query", "vocabulary or GloVe", "qqqzzzxxw")),  # GloVe lacks both
    ("people " * 10_000, ("query", "70000 characters", "at most 10000")),
], ids=["empty", "whitespace", "unknown words", "10000 words"])
def test_bad_text_query(trained, text, needles, record_property):
    one_error_line(query(trained, text), record_property, *needles)


def _utf8_env():
    return {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONIOENCODING": ""}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["plain", "json"])
def test_non_utf8_query_bytes(trained, extra):
    """Undecodable bytes in argv (Python hands them over as lone surrogates) are not words:
    the query runs on the words around them and prints without a UnicodeEncodeError."""
    argv = [sys.executable, "cli.py", "query", b"people \xff\xfe waiting for a train",
            "--index", str(trained / "index"), "--k", "3", *extra]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, env=_utf8_env(), timeout=120)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    if extra:
        assert len(json.loads(out)["results"]) == 3
    else:
        assert sum(line.lstrip().startswith(("1 ", "2 ", "3 ")) for line in out.splitlines()) == 3


def test_k_out_of_range(trained, record_property):
    for k in ("0", "-3"):
        one_error_line(query(trained, "a dog", "--k", k), record_property, f"--k {k}", "at least 1")
    res = query(trained, "a dog", "--k", "5000", "--json")  # more than the 1000 images
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)["results"]
    assert len(hits) == 1000 and sorted(h["id"] for h in hits) == list(range(1000))


def test_unknown_score_and_no_query(trained, record_property):
    one_error_line(query(trained, "a dog", "--score", "cosine"), record_property, "--score cosine")
    one_error_line(query(trained), record_property, "--image")


# --- image queries ------------------------------------------------------------------------------

def _bomb_png(path: Path, side: int = 20_000) -> Path:
    """A valid PNG header declaring side×side pixels: what a decompression bomb looks like."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("make,needles", [
    (lambda d: d / "nope.png", ("--image", "nope.png", "file not found")),
    (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png",
     ("--image", "notes.png", "not an image")),
    (lambda d: _truncated_jpeg(d / "cut.jpg"), ("--image", "cut.jpg", "cannot decode")),
    (lambda d: _bomb_png(d / "huge.png"), ("--image", "huge.png", "larger than")),
    (lambda d: _bomb_png(d / "big.png", 12_000), ("--image", "big.png", "larger than")),
    (lambda d: d, ("--image", "file not found")),
], ids=["missing", "not an image", "truncated jpeg", "huge image", "1-2x the pixel limit",
        "a directory"])
def test_bad_image_query(trained, tmp_path, make, needles, record_property):
    path = make(tmp_path)
    one_error_line(query(trained, "--image", str(path)), record_property, *needles)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_odd_image_modes_work(trained, tmp_path, mode):
    src = Image.open(scene_image(trained)).convert("RGB")
    img = src.convert("L").convert("I;16") if mode == "I;16" else src.convert(mode)
    path = tmp_path / f"q-{mode.replace(';', '')}.png"
    img.save(path)
    res = query(trained, "--image", str(path), "--k", "4", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["modality"] == "text" and len(out["results"]) == 4


# --- several readers at once ------------------------------------------------------------------

@pytest.mark.slow
def test_concurrent_queries(trained):
    argv = [sys.executable, "cli.py", "query", "people waiting for a train", "--index",
            str(trained / "index"), "--k", "5", "--json"]
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-500:] for _, e in outs]
    results = [json.loads(o)["results"] for o, _ in outs]
    assert all(r == results[0] for r in results) and len(results[0]) == 5


# --- info and the contact sheet ---------------------------------------------------------------

def test_info_on_a_trained_index(trained):
    info = index_info(trained / "index")
    ckpt = trained / "run" / "checkpoint.pt"
    assert Path(info["checkpoint"]["path"]).resolve() == ckpt.resolve()
    assert info["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert info["checkpoint"]["exists"] and info["checkpoint"]["matches"] is True
    assert info["counts"] == {"image": 1000, "text": 5000}
    res = runner.invoke(app, ["info", str(trained / "index")])
    assert res.exit_code == 0, res.output
    assert "1000" in res.output and "5000" in res.output and sha256_file(ckpt) in res.output


def _tile_region(x, y, thumb, img):
    """Where _tile pastes an image: centred in its thumb x thumb tile."""
    ox, oy = x + (thumb - img.width) // 2, y + (thumb - img.height) // 2
    return (ox, oy, ox + img.width, oy + img.height)


def _grown(path, factor):
    """The 64-px scene image as the sheet should show it: whole-factor nearest-neighbour."""
    img = Image.open(path).convert("RGB")
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def test_contact_sheet_text_query(trained, tmp_path):
    with open_engine(trained / "index") as eng:
        result = eng.query_text("a red car next to a dog", k=7)
    path = contact_sheet(result, tmp_path / "sheet.png", thumb=128, cols=5)
    sheet = Image.open(path).convert("RGB")
    assert sheet.size == (5 * 136 + 8, 24 + 2 * (128 + 34 + 8))
    for i in (0, 6):  # first tile of row 1 and second tile of row 2 show their hit's image
        hit = _grown(result.results[i].item, 2)
        x, y = 8 + (i % 5) * 136, 24 + (i // 5) * 170
        crop = sheet.crop(_tile_region(x, y, 128, hit))
        assert np.array_equal(np.asarray(crop), np.asarray(hit))


def test_contact_sheet_image_query(trained, tmp_path):
    with open_engine(trained / "index") as eng:
        result = eng.query_image(scene_image(trained), k=3)
        more = eng.query_image(scene_image(trained), k=30)
    small = Image.open(contact_sheet(result, tmp_path / "a.png", thumb=64)).convert("RGB")
    big = Image.open(contact_sheet(more, tmp_path / "b.png", thumb=64)).convert("RGB")
    query_img = _grown(scene_image(trained), 2)
    crop = small.crop(_tile_region(8, 8, 128, query_img))
    assert np.array_equal(np.asarray(crop), np.asarray(query_img))
    assert big.height > small.height  # one line per caption


def test_contact_sheet_bad_paths(trained, tmp_path):
    with open_engine(trained / "index") as eng:
        result = eng.query_text("a dog", k=2)
    (tmp_path / "keep.png").write_bytes(b"old")
    for bad, needle in ((tmp_path / "x.jpg", "must be a .png"),
                        (tmp_path / "no" / "x.png", "does not exist")):
        with pytest.raises(PcmeError, match=needle) as e:
            contact_sheet(result, bad)
        assert str(bad) in str(e.value)
    assert (tmp_path / "keep.png").read_bytes() == b"old"


def test_cli_query_show(trained, tmp_path, record_property):
    png = tmp_path / "results.png"
    res = query(trained, "a red car", "--k", "4", "--show", str(png))
    assert res.exit_code == 0, res.output
    assert Image.open(png).format == "PNG"
    one_error_line(query(trained, "a red car", "--show", str(tmp_path / "r.jpg")), record_property,
                   "--show", "r.jpg")


# --- help -----------------------------------------------------------------------------------------

def test_every_command_documents_every_option():
    """Each option shows in --help with a help text that says its default (typer prints
    `[default: x]` for non-None defaults; None defaults must say it in the text), and every
    command takes -v. All problems are listed at once."""
    group = typer.main.get_command(app)
    problems = []
    for name, cmd in group.commands.items():
        res = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
        assert res.exit_code == 0, res.output
        opts = [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]
        if not any("-v" in p.opts for p in opts):
            problems.append(f"{name}: no -v")
        for p in opts:
            long = max(p.opts, key=len)
            if long not in res.output:
                problems.append(f"{name} --help does not show {long}")
            if not p.help:
                problems.append(f"{name} {long}: no help text")
            elif not (p.required or p.is_flag or p.default is not None
                      or isinstance(p.show_default, str) or "default" in p.help.lower()):
                problems.append(f"{name} {long}: help does not say the default")
    missing = {"train", "encode", "index", "query", "eval", "info"} - set(group.commands)
    if missing:
        problems.append(f"no command(s) {sorted(missing)}")
    if "query" in group.commands and not any("--show" in p.opts for p in group.commands["query"].params):
        problems.append("query: no --show")
    assert not problems, "\n".join(problems)


def test_cli_defaults_are_the_config_defaults_and_help_shows_them():
    """TrainConfig holds the only copy of each training default: train's options leave the
    value to it (None) and show its default; encode/eval use the same run folder, dataset and
    device; --data lists every dataset the readers know."""
    from encoders.training.config import TrainConfig
    from encoders.training.data import LOADERS

    cfg = TrainConfig()
    group = typer.main.get_command(app)
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    for p in group.commands["train"].params:
        if hasattr(cfg, p.name) and p.name != "glove":
            assert p.default is None, p.name           # a flag not typed leaves the config's value
            assert p.show_default == str(getattr(cfg, p.name)), p.name
            assert f"[default: ({getattr(cfg, p.name)})]" in flat, p.name
    for dataset in LOADERS:
        assert dataset in flat
    for command in ("encode", "eval"):
        params = {p.name: p.default for p in group.commands[command].params}
        assert params["checkpoint"] == f"{cfg.out}/checkpoint.pt"
        assert (params["data"], params["root"], params["device"]) == (cfg.data, cfg.root, cfg.device)
        assert params["split"] == cfg.eval_split


@pytest.mark.parametrize("command", [
    ["bench", "--synthetic", "2000", "--dim", "16"],
    ["eval", "--checkpoint", "no-such.pt"],
])
def test_bad_plot_path_fails_before_any_work(tmp_path, record_property, command):
    """A --plot that cannot be written is a one-line error before the work starts: the bench
    writes no synthetic data, eval does not even look for its checkpoint."""
    bad = tmp_path / "no" / "such" / "p.png"
    res = runner.invoke(app, [*command, "--plot", str(bad), "--workdir", str(tmp_path / "w")]
                        if command[0] == "bench" else [*command, "--plot", str(bad)])
    one_error_line(res, record_property, "--plot", str(bad), "does not exist")
    assert not (tmp_path / "w").exists()
