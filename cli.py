"""pcme-search command line: train → index → query, plus encode and eval.

Each command parses its options, calls one library function and prints the result. Known failures
(bad input, missing files) end as one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from engine.errors import PcmeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Probabilistic (PCME) image-text search: train, index, query.")
err = typer.echo


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
    except KeyboardInterrupt:
        err("interrupted", err=True)
        raise typer.Exit(130)


Verbose = typer.Option(False, "--verbose", "-v", help="Debug logging.")


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="Dataset: scenes (built-in). [default: scenes]"),
    root: Optional[str] = typer.Option(None, help="Dataset root folder. [default: data]"),
    out: Optional[str] = typer.Option(None, help="Run folder for checkpoint and logs. [default: runs/latest]"),
    shards: Optional[str] = typer.Option(None, help="Where the eval split's shards go. [default: out]"),
    epochs: Optional[int] = typer.Option(None, help="Training epochs. [default: 8]"),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per step. [default: 128]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate. [default: 2e-3]"),
    loss: Optional[str] = typer.Option(None, help="pcme, pcmepp, infonce or vse++. [default: pcme]"),
    positives: Optional[str] = typer.Option(None, help="In-batch positives: pairs (captions written for the image) or plausible (every caption true of it: scenes, cub). [default: pairs]"),
    train_images: Optional[int] = typer.Option(None, help="Scenes training images. [default: 10000]"),
    glove: Optional[str] = typer.Option(None, help="GloVe text file; default: offline GloVe 6B 50-d."),
    seed: Optional[int] = typer.Option(None, help="Random seed. [default: 0]"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda. [default: auto]"),
    config: Optional[str] = typer.Option(None, help="TOML or JSON file of train options; flags override it. [default: none]"),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out from last.pt."),
    verbose: bool = Verbose,
):
    """Train PCME encoders, evaluate on the test split and write its μ/log σ² shards."""
    _setup_logging(verbose)
    from encoders.config import load_train_config
    from encoders.train import train as run_train

    overrides = dict(data=data, root=root, out=out, shards=shards, epochs=epochs,
                     batch_size=batch_size, lr=lr, loss=loss, positives=positives,
                     train_images=train_images, glove=glove, seed=seed, device=device)
    cfg = _run(load_train_config, config, overrides)
    result = _run(run_train, cfg, resume)
    typer.echo(f"trained in {result['train_s']} s -> {result['checkpoint']}")
    _print_eval(result["eval"])
    if "shards" in result:
        typer.echo(f"shards: {result['shards']}/   (next: python cli.py index --shards {result['shards']})")


@app.command()
def encode(
    checkpoint: str = typer.Option("runs/latest/checkpoint.pt", help="Trained checkpoint."),
    data: str = typer.Option("scenes", help="Dataset name."),
    root: str = typer.Option("data", help="Dataset root folder."),
    split: str = typer.Option("test", help="Split to encode."),
    out: str = typer.Option("out", help="Shard directory to write."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    verbose: bool = Verbose,
):
    """Encode a split with a checkpoint into μ/log σ² parquet shards."""
    _setup_logging(verbose)
    from encoders.pipeline import encode_to_shards

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
    verbose: bool = Verbose,
):
    """Build FAISS indexes on μ and an LMDB store of log σ² from shards."""
    _setup_logging(verbose)
    from encoders.progress import StageBars
    from indexer.build import build_index

    names = tuple(s.strip() for s in augmented.split(",") if s.strip())
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
    score: str = typer.Option("elk", help="Rescoring: elk, mc, csd, w2, bhattacharyya or mu."),
    image: Optional[str] = typer.Option(None, help="Image file to query with (searches captions). [default: none]"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = typer.Option("cpu", help="Device for query encoding: auto, cpu or cuda."),
    exact: bool = typer.Option(False, "--exact", help="Score every item (no ANN): the reference."),
    show: Optional[str] = typer.Option(None, help="Also write a PNG contact sheet of the hits "
                                       "(rank, score, σ² under each). [default: none]"),
    verbose: bool = Verbose,
):
    """Search the index with a text (or --image) query and print ranked hits with uncertainty."""
    _setup_logging(verbose)
    from engine.search import SearchEngine

    if (text is None) == (image is None):
        err("error: give either a text query or --image PATH", err=True)
        raise typer.Exit(2)
    with _run(SearchEngine, index, device) as engine:
        if image is not None:
            result = _run(engine.query_image, image, k, score, exact)
        else:
            result = _run(engine.query_text, text, k, score, exact)
    if show:
        from engine.contact_sheet import contact_sheet
        _run(contact_sheet, result, show)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
        return
    _print_result(result)


@app.command()
def info(
    index_dir: str = typer.Argument("index", help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
    verbose: bool = Verbose,
):
    """Show what an index holds: counts, dim, factory, nprobe, model + sha256, size on disk."""
    _setup_logging(verbose)
    from engine.info import format_info, index_info

    facts = _run(index_info, index_dir)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    for line in format_info(facts):
        typer.echo(line)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option("runs/latest/checkpoint.pt", help="Trained checkpoint."),
    data: str = typer.Option("scenes", help="Dataset name."),
    root: str = typer.Option("data", help="Dataset root folder."),
    split: str = typer.Option("test", help="Split to evaluate; coco test1k = mean over the five 1K folds."),
    scores: str = typer.Option("mu,csd,elk,mc", help="Comma-separated scores: mu, elk, csd, w2, bhattacharyya, mc."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG of R@1 per caption-uncertainty bin. [default: none]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    verbose: bool = Verbose,
):
    """Evaluate a checkpoint on a split against its ground truth, with an uncertainty report."""
    _setup_logging(verbose)
    from encoders.evaluate import plot_uncertainty
    from encoders.pipeline import evaluate_checkpoint

    names = tuple(s.strip() for s in scores.split(",") if s.strip())
    report = _run(evaluate_checkpoint, checkpoint, data, root, split, names, device)
    if plot:
        _run(plot_uncertainty, report, plot)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_eval(report)


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
    from engine.bench import BenchConfig, format_table, run_bench

    names = tuple(s.strip() for s in scores.split(",") if s.strip())
    extra = tuple(s.strip() for s in augmented.split(",") if s.strip())
    cfg = BenchConfig(index=Path(index) if index else None, synthetic=synthetic, dim=dim,
                      workdir=Path(workdir), factory=factory, augmented=extra, scores=names,
                      queries=queries, batch=batch, recall_queries=recall_queries,
                      mc_recall_queries=mc_recall_queries, recall_target=recall_target,
                      shortlist=shortlist)
    report = _run(run_bench, cfg)
    if plot:
        from engine.plot import plot_latency_recall

        _run(plot_latency_recall, report, Path(plot))
    typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))


def _print_eval(report: dict) -> None:
    typer.echo(f"{report['split']}: {report['n_images']} images, {report['n_captions']} captions")
    typer.echo(f"{'score':<14}{'dir':<5}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'PMRP':>7}{'mAP@R':>7}{'RSUM':>8}")
    for name, rep in report["by_score"].items():
        for d in ("t2i", "i2t"):
            m = rep[d]
            rsum = f"{rep['rsum']:8.1f}" if d == "t2i" else ""
            typer.echo(f"{name:<14}{d:<5}{m['R@1']:7.3f}{m['R@5']:7.3f}{m['R@10']:7.3f}"
                       f"{m['PMRP']:7.3f}{m['mAP@R']:7.3f}{rsum}")
    unc = report.get("uncertainty")
    if unc:
        typer.echo(f"uncertainty ({unc['score']}): Spearman(caption Σσ², true matches) = "
                   f"{unc['spearman_caption_var_vs_matches']:.3f}; t2i R@1 per Σσ² bin, low→high: "
                   + " ".join(f"{b['R@1']:.2f}" for b in unc["bins"]))
        for g in unc.get("by_group", []):
            typer.echo(f"  {g['group']:<10} n {g['n']:5d}  true matches {g['mean_matches']:7.1f}  "
                       f"Σσ² {g['mean_var']:.4g}  t2i R@1 {g['R@1']:.3f}")


def _print_result(result) -> None:
    if result.unknown_words:
        typer.echo(f"note: not in the vocabulary, ignored: {' '.join(result.unknown_words)}")
    typer.echo(f"query uncertainty (mean σ²): {result.query_uncertainty:.4f}   score: {result.score}")
    for h in result.results:
        typer.echo(f"{h.rank:3d}  {h.score:10.4f}  σ² {h.uncertainty:.4f}  #{h.id:<7d} {h.item}")
    t = result.timings_ms
    typer.echo("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


if __name__ == "__main__":
    app()
