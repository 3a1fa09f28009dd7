"""pcme-search command line: train → index → query, plus encode, eval, info and bench.

Each command parses its options, calls one library function and prints the result. Known failures
(bad input, missing files) end as one line on stderr and exit code 2, never a traceback.
This module is where the stages meet: it hands the engine a query encoder built from the
checkpoint an index names (`open_engine`), and it makes the process-wide settings.
Installed with the package: `pcme <command>` is `python cli.py <command>`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from core.atomic import check_writable
from core.commands import cli_command
from core.constants import DEFAULT_SCORE
from cli_output import print_eval, print_result
from core.errors import PcmeError
from core.process import configure_process
from encoders.training.config import TrainConfig
from encoders.training.data import LOADERS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Probabilistic (PCME) image-text search: train, index, query.")
err = typer.echo
DEFAULTS = TrainConfig()          # the one copy of every training default
CHECKPOINT = f"{DEFAULTS.out}/checkpoint.pt"
DATASETS = tuple(LOADERS)
# Commands that only read: once one has succeeded and its output is flushed, the console entry
# point ends the process without the interpreter's shutdown (main)
ENDS_AT_ONCE = ("query",)
_run_state: dict = {}


@app.callback()
def _edge(ctx: typer.Context) -> None:
    """Process-wide settings, before any command imports torch or faiss."""
    _run_state["command"] = ctx.invoked_subcommand
    configure_process(ctx.invoked_subcommand)


def open_engine(index: str | Path, device: str = "cpu"):
    """A SearchEngine on `index` with the query encoder of the checkpoint its manifest names
    (none when it names none, e.g. synthetic benchmark indexes)."""
    from functools import partial

    from encoders.model.query import QueryEncoder
    from engine.search import SearchEngine
    from engine.sharded import ShardedEngine, is_sharded

    engine = ShardedEngine if is_sharded(index) else SearchEngine  # sharded: Ray is connected
    return engine(index, make_encoder=partial(QueryEncoder.for_index, device=device))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    # faiss logs which SIMD build it loads, with the failed attempts as exceptions: noise, not errors
    logging.getLogger("faiss").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _run(fn, *args, **kwargs):
    """Call fn; turn known failures into one line and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except PcmeError as e:
        err(f"error: {e}", err=True)
        raise typer.Exit(2)
    except OSError as e:  # a disk that filled up or went read-only mid-run: one line, not a trace
        where = f"{e.filename}: " if e.filename else ""
        err(f"error: {where}{e.strerror or e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt as e:
        resume = getattr(e, "resume", None)  # training says how to continue
        err(f"interrupted; resume with: {resume}" if resume else "interrupted", err=True)
        raise typer.Exit(130)


def _artefact(what: str, write, *args) -> None:
    """Write an optional picture after the results were printed: a failure is a one-line
    warning, never a lost run; success says where it went (on stderr: stdout may be JSON)."""
    try:
        path = write(*args)
    except (PcmeError, OSError) as e:
        err(f"warning: {what} not written: {e}", err=True)
        return
    err(f"wrote {what}: {path}", err=True)


Verbose = typer.Option(False, "--verbose", "-v", help="Debug logging.")
RayOption = typer.Option(None, "--ray", help="Run on Ray: a running cluster's address (ray start "
                         "--head prints it; 'auto') or local:N to start N local workers. "
                         "[default: none: one process]")


def _default(name: str, help: str):
    """A train option whose default (shown in --help) is TrainConfig's; None when not given,
    so a --config file's value is overridden only by flags the user typed."""
    return typer.Option(None, help=help, show_default=str(getattr(DEFAULTS, name)))


@app.command()
def train(
    data: Optional[str] = _default("data", f"Dataset: {', '.join(DATASETS)}."),
    root: Optional[str] = _default("root", "Dataset root folder (the scenes are generated there)."),
    out: Optional[str] = _default("out", "Run folder for checkpoint, log and eval."),
    shards: Optional[str] = _default("shards", "Where the eval split's shards go."),
    epochs: Optional[int] = _default("epochs", "Training epochs."),
    batch_size: Optional[int] = _default("batch_size", "Images per step."),
    lr: Optional[float] = _default("lr", "Peak learning rate."),
    loss: Optional[str] = _default("loss", "pcme, pcmepp, infonce or vse++."),
    positives: Optional[str] = _default("positives", "In-batch positives: auto (plausible where the "
                                        "dataset knows, else pairs), pairs (captions written "
                                        "for the image) or plausible (every caption true of it: "
                                        "scenes, cub)."),
    train_images: Optional[int] = _default("train_images", "Scenes training images."),
    backbone: Optional[str] = typer.Option(None, help="Image backbone: resnet or "
                                           "efficientnet-lite0 (ImageNet-pretrained, offline).",
                                           show_default=DEFAULTS.model.backbone),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels (efficientnet-lite0: "
                                             "224 native, 128 for CPU).",
                                             show_default=str(DEFAULTS.model.image_size)),
    freeze_backbone_epochs: Optional[int] = _default("freeze_backbone_epochs", "Epochs with the "
                                                     "backbone frozen (>= epochs: all of them)."),
    backbone_lr_scale: Optional[float] = _default("backbone_lr_scale", "Backbone lr = lr x this "
                                                  "after the frozen epochs."),
    glove: Optional[str] = typer.Option(None, help="GloVe text file.",
                                        show_default="offline GloVe 6B 50-d"),
    freeze_word_vectors: Optional[bool] = typer.Option(
        None, "--freeze-word-vectors/--train-word-vectors", help="Keep word vectors at GloVe "
        "(words unseen in training then enter queries in the same input space).",
        show_default=str(DEFAULTS.model.freeze_word_vectors).lower()),
    class_words: Optional[bool] = typer.Option(
        None, "--class-words/--no-class-words", help="efficientnet-lite0: its ImageNet class "
        "names join both towers (words never seen in training still find photos).",
        show_default="on with efficientnet-lite0"),
    seed: Optional[int] = _default("seed", "Random seed."),
    device: Optional[str] = _default("device", "auto, cpu or cuda."),
    config: Optional[str] = typer.Option(None, help="TOML or JSON file of train options; flags "
                                         "override it.", show_default="none"),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out from last.pt."),
    force: bool = typer.Option(False, help="Replace the run already in --out (its checkpoint, "
                               "log and eval) with a new one."),
    verbose: bool = Verbose,
):
    """Train PCME encoders, evaluate on the test split and write its μ/log σ² shards.
    A run folder that already holds a run is refused unless --resume or --force says what to do."""
    _setup_logging(verbose)
    from encoders.training.config import load_train_config
    from encoders.training.runs import run_training

    overrides = dict(data=data, root=root, out=out, shards=shards, epochs=epochs,
                     batch_size=batch_size, lr=lr, loss=loss, positives=positives,
                     train_images=train_images, glove=glove, seed=seed, device=device,
                     freeze_backbone_epochs=freeze_backbone_epochs,
                     backbone_lr_scale=backbone_lr_scale,
                     model={"backbone": backbone, "image_size": image_size,
                            "freeze_word_vectors": freeze_word_vectors,
                            "class_words": class_words})
    cfg = _run(load_train_config, config, overrides)
    result = _run(run_training, cfg, resume, force)
    typer.echo(f"trained in {result['train_s']} s -> {result['checkpoint']}")
    print_eval(result["eval"])
    if "shards" in result:
        typer.echo(f"shards: {result['shards']}/   (next: "
                   f"{cli_command('index', '--shards', result['shards'])})")


@app.command()
def encode(
    checkpoint: str = typer.Option(CHECKPOINT, help="Trained checkpoint."),
    data: str = typer.Option(DEFAULTS.data, help=f"Dataset: {', '.join(DATASETS)}."),
    root: str = typer.Option(DEFAULTS.root, help="Dataset root folder."),
    split: str = typer.Option(DEFAULTS.eval_split, help="Split to encode."),
    images: Optional[str] = typer.Option(None, help="Encode every image under this folder "
                                         "(recursive) instead of a dataset split.",
                                         show_default="none"),
    captions: Optional[str] = typer.Option(None, help="Encode the captions of this file (one per "
                                           "line, or .jsonl) instead of a dataset split.",
                                           show_default="none"),
    out: str = typer.Option(DEFAULTS.shards, help="Shard directory to write."),
    device: str = typer.Option(DEFAULTS.device, help="auto, cpu or cuda."),
    ray: Optional[str] = RayOption,
    part_rows: Optional[int] = typer.Option(None, help="With --ray: rows per part, a multiple "
                                            "of 512. [default: 16384]"),
    verbose: bool = Verbose,
):
    """Encode a dataset split, or a folder of images and/or a caption file, into μ/log σ² shards."""
    _setup_logging(verbose)
    if images or captions:
        from encoders.training.encode_files import encode_files_to_shards

        done = _run(encode_files_to_shards, checkpoint, out, images, captions, device)
        skipped = f", {done['skipped']} unreadable files skipped (listed in {out}/manifest.json)"
        typer.echo(f"encoded {done['images']} images and {done['captions']} captions"
                   f"{skipped if done['skipped'] else ''}")
        typer.echo(f"shards: {out}   (next: python cli.py index --shards {out})")
        return
    if ray:
        from core.cluster import ray_cluster
        from encoders.training.distributed import encode_distributed

        with _run(ray_cluster, ray):
            path, facts = _run(encode_distributed, checkpoint, data, root, split, out, device,
                               part_rows)
        typer.echo(f"shards: {path}  ({facts['encoded']} parts encoded, {facts['skipped']} "
                   f"resumed, {facts['workers_lost']} workers lost)")
        return
    from encoders.training.pipeline import encode_to_shards

    _run(check_writable, out, "--out")
    path = _run(encode_to_shards, checkpoint, data, root, split, out, device)
    typer.echo(f"shards: {path}")


@app.command()
def index(
    shards: str = typer.Option(..., help="Shard directory written by train or encode."),
    out: str = typer.Option("index", help="Index directory to (re)build atomically."),
    factory: str = typer.Option("auto", help='FAISS factory string, e.g. "IVF1024,Flat"; auto picks by size.'),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists probed per query; default: tuned for --recall-target."),
    recall_target: float = typer.Option(0.95, help="μ recall@10 the tuned nprobe must reach on held-out probes."),
    augmented: str = typer.Option("", help="Also build exact augmented indexes for these scores, e.g. csd,w2."),
    ray: Optional[str] = RayOption,
    part_rows: Optional[int] = typer.Option(None, help="With --ray: rows per part, a multiple "
                                            "of 4096. [default: 1048576]"),
    sharded: bool = typer.Option(False, help="With --ray: keep the parts as a sharded index "
                                 "(searched by one Ray actor per shard) instead of merging."),
    verbose: bool = Verbose,
):
    """Build FAISS indexes on μ and an LMDB store of log σ² from shards."""
    _setup_logging(verbose)
    from core.progress import StageBars

    names = tuple(s.strip() for s in augmented.split(",") if s.strip())
    _run(check_writable, out, "--out")
    if ray:
        from core.cluster import ray_cluster
        from indexer.distributed import build_index_distributed

        if names:
            err("error: --augmented is not built by --ray (build it without --ray)", err=True)
            raise typer.Exit(2)
        with _run(ray_cluster, ray), StageBars("index") as bars:
            manifest = _run(build_index_distributed, Path(shards), Path(out), factory, nprobe,
                            bars, recall_target=recall_target, part_rows=part_rows, sharded=sharded)
        typer.echo(f"indexed {manifest['counts']} on Ray in {manifest['build_s']:.2f} s -> {out}/ "
                   f"({len(manifest['build']['ray']['parts'])} parts, {'sharded' if sharded else 'merged'})")
        return
    from indexer.build import build_index

    with StageBars("index") as bars:
        manifest = _run(build_index, Path(shards), Path(out), factory, nprobe, progress=bars,
                        augmented=names, recall_target=recall_target)
    counts = ", ".join(f"{n} {m}" for m, n in manifest["counts"].items())
    factories = ", ".join(f"{m}: {f}" + (f" nprobe {manifest['nprobe'][m]}" if manifest["nprobe"].get(m) else "")
                          for m, f in manifest["factory"].items())
    typer.echo(f"indexed {counts} in {manifest['build_s']:.2f} s -> {out}/  [{factories}]")


@app.command()
def query(
    text: Optional[str] = typer.Argument(None, help="Text query (searches images)."),
    index: str = typer.Option("index", help="Index directory."),
    k: int = typer.Option(10, help="Number of results."),
    score: Optional[str] = typer.Option(None, help="Rescoring: elk, mc, csd, w2, bhattacharyya or mu.",
                                        show_default=f"{DEFAULT_SCORE['text']} for text, "
                                                     f"{DEFAULT_SCORE['image']} for --image"),
    image: Optional[str] = typer.Option(None, help="Image file to query with (searches captions). [default: none]"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = typer.Option("cpu", help="Device for query encoding: auto, cpu or cuda."),
    exact: bool = typer.Option(False, "--exact", help="Score every item (no ANN): the reference."),
    show: Optional[str] = typer.Option(None, help="Also write a PNG contact sheet of the hits "
                                       "(rank, score, σ² under each). [default: none]"),
    ray: Optional[str] = RayOption,
    verbose: bool = Verbose,
):
    """Search the index with a text (or --image) query and print ranked hits with uncertainty."""
    _setup_logging(verbose)
    from core.charts import check_png_path
    from core.scores import score_name

    score = _run(score_name, score, "--score") if score else None
    if (text is None) == (image is None):
        err("error: give either a text query or --image PATH", err=True)
        raise typer.Exit(2)
    if show:
        _run(check_png_path, show, "--show")
        _run(check_writable, show, "--show")
    from contextlib import nullcontext

    from engine.sharded import is_sharded

    if is_sharded(index) and not ray:
        err(f"error: {index} is a sharded index: give --ray ADDRESS (or local:N) to search it", err=True)
        raise typer.Exit(2)
    if ray:
        from core.cluster import ray_cluster
    with (_run(ray_cluster, ray) if ray else nullcontext()), _run(open_engine, index, device) as engine:
        if image is not None:
            result = _run(engine.query_image, image, k, score, exact)
        else:
            result = _run(engine.query_text, text, k, score, exact)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        print_result(result)
    if show:
        from engine.contact_sheet import contact_sheet
        _artefact("contact sheet", contact_sheet, result, show)


@app.command()
def info(
    index_dir: str = typer.Argument("index", help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
    verbose: bool = Verbose,
):
    """Show what an index holds: counts, dim, factory, nprobe, model + sha256, size on disk."""
    _setup_logging(verbose)
    from indexer.info import format_info, index_info

    facts = _run(index_info, index_dir)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for line in format_info(facts):
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(CHECKPOINT, help="Trained checkpoint."),
    data: str = typer.Option(DEFAULTS.data, help=f"Dataset: {', '.join(DATASETS)}."),
    root: str = typer.Option(DEFAULTS.root, help="Dataset root folder."),
    split: str = typer.Option(DEFAULTS.eval_split, help="Split to evaluate; coco test1k = mean over the five 1K folds."),
    scores: str = typer.Option("mu,csd,elk,mc", help="Comma-separated scores: mu, elk, csd, w2, bhattacharyya, mc."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG of R@1 per caption-uncertainty bin. [default: none]"),
    open_vocab: bool = typer.Option(False, "--open-vocab", help="Read captions as query does: "
                                    "words unseen in training through GloVe (default: <unk>)."),
    device: str = typer.Option(DEFAULTS.device, help="auto, cpu or cuda."),
    verbose: bool = Verbose,
):
    """Evaluate a checkpoint on a split against its ground truth, with an uncertainty report."""
    _setup_logging(verbose)
    from core.charts import check_png_path
    from core.scores import score_name
    from encoders.training.pipeline import evaluate_checkpoint
    from encoders.training.plots import plot_uncertainty

    names = tuple(_run(score_name, s, "--scores") for s in scores.split(",") if s.strip())
    if plot:
        _run(check_png_path, plot)
        _run(check_writable, plot, "--plot")
    report = _run(evaluate_checkpoint, checkpoint, data, root, split, names, device, open_vocab)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_eval(report)
    if plot:
        _artefact("uncertainty plot", plot_uncertainty, report, plot)


@app.command()
def bench(
    index: Optional[str] = typer.Option(None, help="Existing index directory to benchmark. [default: none]"),
    synthetic: Optional[int] = typer.Option(None, help="Instead: N clustered synthetic items, written and indexed. [default: none]"),
    dim: int = typer.Option(256, help="Dimension of the synthetic vectors."),
    workdir: str = typer.Option("bench_work", help="Where synthetic shards and index are written."),
    factory: str = typer.Option("auto", help="FAISS factory for the synthetic index."),
    augmented: str = typer.Option("", help="Also build exact augmented indexes, e.g. csd,w2."),
    scores: str = typer.Option("mu,elk,csd,w2,bhattacharyya,mc", help="Scores to measure."),
    queries: int = typer.Option(200, help="Single queries per score."),
    batch: int = typer.Option(64, help="Queries per search_batch call."),
    recall_queries: int = typer.Option(50, help="Queries checked against exhaustive search."),
    mc_recall_queries: int = typer.Option(5, help="Same for mc (exhaustive Monte Carlo is costly)."),
    recall_target: float = typer.Option(0.999, help="μ recall@10 the synthetic build tunes nprobe for."),
    shortlist: Optional[int] = typer.Option(None, help="Fixed shortlist (no bound): measure its recall. [default: none: bounded]"),
    plot: Optional[str] = typer.Option(None, help="Write a latency-vs-recall chart (PNG). [default: none]"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    verbose: bool = Verbose,
):
    """Latency (per stage, p50/p95/p99), QPS and recall@10 against --exact, for every score."""
    _setup_logging(verbose)
    from benchmarks.harness import BenchConfig, format_table, run_bench
    from core.charts import check_png_path

    if plot:
        _run(check_png_path, plot)
    names = tuple(s.strip() for s in scores.split(",") if s.strip())
    extra = tuple(s.strip() for s in augmented.split(",") if s.strip())
    cfg = BenchConfig(index=Path(index) if index else None, synthetic=synthetic, dim=dim,
                      workdir=Path(workdir), factory=factory, augmented=extra, scores=names,
                      queries=queries, batch=batch, recall_queries=recall_queries,
                      mc_recall_queries=mc_recall_queries, recall_target=recall_target,
                      shortlist=shortlist)
    if synthetic:
        _run(check_writable, workdir, "--workdir", inside=True)
    if plot:
        _run(check_writable, plot, "--plot")
    report = _run(run_bench, cfg, _bench_engine)
    typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if plot:
        from benchmarks.plot import plot_latency_recall

        _artefact("latency-recall plot", plot_latency_recall, report, Path(plot))


@app.command()
def serve(
    index: list[str] = typer.Option(["index"], help="Index directory, or NAME=DIR; repeat for several "
                                    "(the first is the default)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    device: str = typer.Option("cpu", help="Device for query encoding: auto, cpu or cuda."),
    image_root: list[str] = typer.Option([], help="Folder images may be served from; repeatable. "
                                         "[default: the folder holding all of an index's images]"),
    max_batch: int = typer.Option(32, help="Queries per engine call (1: no micro-batching)."),
    max_wait_ms: float = typer.Option(2.0, help="How long a query waits for others to batch with."),
    max_queue: int = typer.Option(256, help="Waiting queries beyond which the service answers 503."),
    verbose: bool = Verbose,
):
    """Serve the search API and web page (http://HOST:PORT/); SIGHUP or POST
    /api/v1/admin/reload (loopback) reloads the indexes after a rebuild."""
    _setup_logging(verbose)
    from functools import partial

    from indexer.manifest import read_index_manifest
    from service.app import serve as run_service
    from service.registry import Registry

    dirs = _run(_named_indexes, index)
    for d in dirs.values():
        _run(read_index_manifest, d)   # fail fast on a wrong path; the heavy load runs in the server
    options = dict(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    registry = _run(Registry, dirs, partial(open_engine, device=device),
                    [Path(r) for r in image_root] or None, options)
    typer.echo(f"serving {', '.join(dirs)} on http://{host}:{port}/  (ready when /readyz answers 200)")
    _run(run_service, registry, host, port, "debug" if verbose else "info")


def _named_indexes(specs: list[str]) -> dict[str, Path]:
    """--index DIR or NAME=DIR, in order; names are unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, _, d = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not name or not d:
            raise PcmeError(f"--index {spec}: expected DIR or NAME=DIR")
        if name in out:
            raise PcmeError(f"--index {spec}: the name {name!r} is given twice")
        out[name] = Path(d)
    return out


def _bench_engine(index: Path):
    """bench encodes the caption texts when the index's checkpoint is at hand, else it queries
    with the stored caption vectors."""
    from engine.search import SearchEngine
    from indexer.manifest import read_index_manifest

    checkpoint = read_index_manifest(index).get("producer", {}).get("checkpoint")
    return open_engine(index) if checkpoint and Path(checkpoint).is_file() else SearchEngine(index)


def main() -> None:
    """Console script entry point (`pcme`). A command of ENDS_AT_ONCE that succeeded skips the
    interpreter's shutdown: with torch, faiss and numba loaded, tearing the modules down took
    0.5–1 s of a one-shot query's ~3 s (its atexit handlers take milliseconds), and a read-only
    command has nothing left to finalise once its output is flushed and its index closed."""
    try:
        app()
    except SystemExit as done:
        if done.code in (0, None) and _run_state.get("command") in ENDS_AT_ONCE:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(0)
        raise


if __name__ == "__main__":
    main()
