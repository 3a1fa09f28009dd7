"""What a new user runs into: unwritable outputs fail before any work, optional pictures never
cost the printed results, query text is normalised and never cut silently, messages name the
next step, charts are plain ASCII with their points inside the frame, hints paste as shown."""
import errno
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from core.charts import ascii_text
from core.commands import cli_command
from encoders.model.text import MAX_WORDS, normalize, tokenize
from tests.helpers import one_error_line

runner = CliRunner()


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A folder nothing can be written in: a read-only tmpfs when we may mount (root), else a
    folder without write permission (non-root); skipped with the reason otherwise."""
    path = tmp_path_factory.mktemp("readonly")
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if shutil.which("mount") is None:
            pytest.skip("running as root without a mount command: root ignores permission "
                        "bits, so no read-only folder can be made")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        mounted = proc.returncode == 0
        if not mounted:
            pytest.skip(f"running as root and mount is not permitted ({proc.stderr.strip()}): "
                        f"root ignores permission bits, so no read-only folder can be made")
    else:
        path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError as e:
        assert e.errno in (errno.EROFS, errno.EACCES)
    else:
        pytest.skip("could not make a read-only folder here")
    yield path
    if mounted:
        subprocess.run(["umount", str(path)], check=False)
    else:
        path.chmod(0o755)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_refuses_unwritable_out_and_shards_before_any_work(readonly, tmp_path, record_property):
    one_error_line(run("train", "--root", tmp_path / "data", "--out", readonly / "run"),
                   record_property, "--out", str(readonly / "run"), "cannot write in")
    one_error_line(run("train", "--root", tmp_path / "data", "--out", tmp_path / "run",
                       "--shards", readonly / "out"), record_property, "--shards", "cannot write in")
    assert not (tmp_path / "data").exists()   # no dataset generated, no training started


def test_index_encode_bench_refuse_unwritable_outputs(readonly, good, trained, record_property):
    one_error_line(run("index", "--shards", good / "out", "--out", readonly / "index"),
                   record_property, "--out", "cannot write in")
    one_error_line(run("encode", "--checkpoint", trained / "run" / "checkpoint.pt", "--root",
                       trained / "data", "--out", readonly / "shards"), record_property,
                   "--out", "cannot write in")
    one_error_line(run("bench", "--synthetic", "200", "--workdir", readonly / "w"),
                   record_property, "--workdir", "cannot write in")
    one_error_line(run("bench", "--index", good / "index", "--plot", readonly / "b.png"),
                   record_property, "--plot", "cannot write in")


def test_query_show_and_eval_plot_refuse_unwritable_paths(readonly, trained, record_property):
    one_error_line(run("query", "a red car", "--index", trained / "index", "--show",
                       readonly / "hits.png"), record_property, "--show", "cannot write in")
    one_error_line(run("eval", "--checkpoint", trained / "run" / "checkpoint.pt", "--root",
                       trained / "data", "--plot", readonly / "unc.png"), record_property,
                   "--plot", "cannot write in")


def test_a_picture_that_fails_late_is_a_warning_after_the_results(trained, tmp_path, monkeypatch):
    def fail(result, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("engine.contact_sheet.contact_sheet", fail)
    res = run("query", "a red car", "--index", trained / "index", "--k", "3", "--show",
              tmp_path / "hits.png")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    warning = [i for i, l in enumerate(lines) if l.startswith("warning: contact sheet not written")]
    hits = [i for i, l in enumerate(lines) if l.lstrip().startswith(("1 ", "2 ", "3 "))]
    assert len(hits) == 3 and len(warning) == 1 and warning[0] > max(hits), res.output


def test_eval_plot_says_where_it_went_and_is_ascii(trained, tmp_path):
    png = tmp_path / "unc.png"
    res = run("eval", "--checkpoint", trained / "run" / "checkpoint.pt", "--root", trained / "data",
              "--scores", "elk", "--json", "--plot", png)
    assert res.exit_code == 0, res.output
    assert f"wrote uncertainty plot: {png}" in res.output
    assert Image.open(png).format == "PNG"
    assert res.stdout.lstrip().startswith("{")   # --json output stays JSON: the note is on stderr


# --- text ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("Ein Café am Bahnhof", ["ein", "cafe", "am", "bahnhof"]),
    ("ＣＡＴ ﬁsh", ["cat", "fish"]),                 # NFKC: full-width letters, the fi ligature
    ("Straße", ["strasse"]),
    ("一只猫", ["一只猫"]),                           # kept, so it is reported as unknown
    ("🐶 🐱!", []),
    ("people's dogs, 2 cats", ["people's", "dogs", "2", "cats"]),
])
def test_tokenize_normalises_unicode(text, words):
    assert tokenize(text) == words
    assert normalize("Café") == "cafe"


def test_query_says_what_was_searched(trained):
    res = run("query", "Xqzvwk Qxjzzq Park", "--index", trained / "index", "--k", "2")
    assert res.exit_code == 0, res.output
    assert "searching for: park" in res.output
    assert "ignored: xqzvwk qxjzzq" in res.output
    res = run("query", "A DÓG in a PÁRK", "--index", trained / "index", "--k", "2", "--json")
    out = __import__("json").loads(res.stdout)
    assert out["searched_words"] == ["a", "dog", "in", "a", "park"] and out["unknown_words"] == []
    assert out["shortlist_size"] >= 2 and "shortlist" not in out["timings_ms"]
    assert all(k.endswith("_ms") for k in out["timings_ms"])


@pytest.mark.parametrize("text,needles", [
    ("qqq " * 70 + "a dog in a park", ("query", f"{70 + 5} words", f"at most {MAX_WORDS}")),
    ("🐶🐱", ("query", "no words in the text")),
    ("一只猫", ("query", "vocabulary", "一只猫")),
], ids=["too long", "emoji", "chinese"])
def test_text_the_encoder_cannot_read_is_refused(trained, text, needles, record_property):
    one_error_line(run("query", text, "--index", trained / "index"), record_property, *needles)


# --- messages -----------------------------------------------------------------------------------

def test_messages_name_the_problem_and_the_next_step(good, trained, tmp_path, record_property):
    shard = next((good / "out").glob("shard-*.parquet"))
    one_error_line(run("index", "--shards", shard, "--out", tmp_path / "i"), record_property,
                   "is a file", "give the shards directory")
    one_error_line(run("index", "--shards", tmp_path / "out", "--out", tmp_path / "i"),
                   record_property, "shards directory does not exist", "cli.py train")
    one_error_line(run("query", "a dog", "--index", tmp_path / "index"), record_property,
                   "index directory does not exist", "cli.py index --shards out/")
    one_error_line(run("eval", "--checkpoint", trained / "run" / "last.pth", "--root",
                       trained / "data"), record_property, "file not found", "checkpoint.pt")
    res = run("query", "a dog", "--index", trained / "index", "--score", "ELK", "--k", "1")
    assert res.exit_code == 0 and "score elk: log expected likelihood kernel" in res.output


def test_hints_quote_paths_and_use_the_running_python(tmp_path):
    hint = cli_command("index", "--shards", "out dir/")
    words = shlex.split(hint)
    assert words[1:] == ["cli.py", "index", "--shards", "out dir/"]
    assert os.path.samefile(words[0], sys.executable)


# --- charts -------------------------------------------------------------------------------------

def test_chart_text_is_ascii():
    assert ascii_text("t2i R@1 per caption Σσ² bin, low → high (μ, −0.5, Café)") == \
        "t2i R@1 per caption sum sigma^2 bin, low -> high (mu, -0.5, Cafe)"


def test_bench_plot_keeps_points_inside_the_frame(tmp_path):
    from benchmarks.plot import COLOURS, H, PAD, W, plot_latency_recall

    report = {"n": 1000, "dim": 8, "factory": "Flat", "scores": {
        name: {"p50_ms": ms, "recall@10": 1.0}
        for name, ms in (("mu", 0.2), ("elk", 0.5), ("csd", 0.9), ("mc", 40.0))}}
    png = plot_latency_recall(report, tmp_path / "b.png")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    for i in range(4):   # the point and its label are drawn in the score's colour
        colour = [int(COLOURS[i][k:k + 2], 16) for k in (1, 3, 5)]
        ys, xs = np.nonzero((pixels == colour).all(axis=2))
        assert len(xs), f"point {i} not drawn"
        assert PAD < xs.min() and xs.max() < W - PAD and PAD < ys.min() and ys.max() < H - PAD, i


def test_bench_table_has_units(good):
    from benchmarks.harness import format_table

    res = run("bench", "--index", good / "index", "--queries", "5", "--recall-queries", "2",
              "--mc-recall-queries", "1", "--scores", "mu")
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[1].split()
    assert header[:4] == ["score", "p50", "ms", "p95"] and "shortlist" in header
    assert format_table.__doc__


def test_readme_tables_are_regenerated_from_eval_json(tmp_path):
    from benchmarks.readme_tables import main

    report = {"by_score": {"elk": {"rsum": 444.25, **{d: {"R@1": 0.5, "R@5": 0.75, "R@10": 0.875,
                                                         "PMRP": 0.25, "mAP@R": 0.125}
                                                     for d in ("t2i", "i2t")}}},
              "uncertainty": {"by_group": [{"group": "setting", "n": 3, "mean_matches": 251.4,
                                            "mean_var": 0.0123, "R@1": 0.996}]}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.json").write_text(__import__("json").dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- readme-table:levels run/eval.json -->\nstale | 1 |\n"
                      "<!-- /readme-table:levels -->\nmiddle\n<!-- readme-table:scores run/eval.json -->\n"
                      "<!-- /readme-table:scores -->\nend\n")
    assert main(["--readme", str(readme), "--check"]) == 1
    assert main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| setting | 251 | 0.012 | 1.00 |" in text and "stale" not in text
    assert "| elk | t2i | 0.500 | 0.750 | 0.875 | 0.250 | 0.125 | 444.2 |" in text
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert main(["--readme", str(readme), "--check"]) == 0


def test_a_query_process_ends_at_once_with_its_output_whole(trained, tmp_path):
    """cli.py main: a successful query ends the process without the interpreter's shutdown
    (os._exit: an atexit handler registered first never runs), yet its output, block-buffered
    into a pipe, arrives whole; a failed query still shuts down as usual and exits 2 with its
    one-line error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wrapper = ("import atexit, runpy, sys; atexit.register(lambda: print('SHUTDOWN', "
               "file=sys.stderr)); sys.argv = ['cli.py'] + sys.argv[1:]; "
               "runpy.run_path('cli.py', run_name='__main__')")

    def cli(*args):
        return subprocess.run([sys.executable, "-c", wrapper, *map(str, args)],
                              capture_output=True, text=True, cwd=root, timeout=300)
    ok = cli("query", "a dog in a park", "--index", trained / "index", "--k", "3", "--json")
    assert ok.returncode == 0, ok.stderr
    out = __import__("json").loads(ok.stdout)
    assert [h["rank"] for h in out["results"]] == [1, 2, 3]
    assert "SHUTDOWN" not in ok.stderr
    bad = cli("query", "a dog", "--index", tmp_path / "missing")
    assert bad.returncode == 2 and bad.stdout == "" and "SHUTDOWN" in bad.stderr
    error = bad.stderr.replace("SHUTDOWN", "").strip()
    assert error.count("\n") == 0 and "index directory does not exist" in error


def test_a_text_query_process_never_imports_torch(trained):
    """A one-shot text query reads the text tower from the checkpoint in numpy and scores in
    numpy (encoders/model/text_numpy.py, core/served_mc.py): python -X importtime lists every
    module the process imported, and neither torch nor any of its modules is among them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-X", "importtime", "cli.py", "query", "a dog in a park",
                          "--index", str(trained / "index"), "--k", "3", "--json"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(__import__("json").loads(run.stdout)["results"]) == 3
    imported = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "numpy" in imported and "faiss" in imported          # the listing is real
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
