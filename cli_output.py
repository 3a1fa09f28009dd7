"""How `cli.py` prints an eval report and a query result (the only module besides cli.py that
prints): tables with units, what the score means, and the query's confidence."""
from __future__ import annotations

import typer


def print_eval(report: dict) -> None:
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


def print_result(result) -> None:
    if result.searched_words is not None:
        typer.echo(f"searching for: {' '.join(result.searched_words)}")
    if result.unknown_words:
        typer.echo(f"note: unknown words (not in training captions nor GloVe), ignored: {' '.join(result.unknown_words)}")
    confidence = ("" if result.confidence is None else
                  f"   confidence (expected R@1) {result.confidence:.2f}"
                  + ("  LOW: consider rephrasing" if result.low_confidence else ""))
    typer.echo(f"query uncertainty Σσ² {result.query_uncertainty:.4f}{confidence}")
    from core.scores import SCORE_MEANING
    typer.echo(f"score {result.score}: {SCORE_MEANING[result.score]}; p_match: Monte-Carlo "
               f"match probability of each hit")
    typer.echo(f"rank  {result.score + ' (higher is better)':>26}  p_match  Σσ²     id       item")
    if getattr(result, "partial", False):
        typer.echo(f"partial: shards {', '.join(result.missing_shards)} did not answer")
    for h in result.results:
        typer.echo(f"{h.rank:4d}  {h.score:26.4f}  {h.p_match:7.3f}  {h.uncertainty:.4f}  "
                   f"#{h.id:<7d} {h.item}")
    t = result.timings_ms
    typer.echo(f"shortlist: {result.shortlist_size} candidates rescored; timings (ms): "
               + ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in t.items()))
