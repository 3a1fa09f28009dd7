"""Train runs on the same scenes budget and write one comparison table.

Each run is a config file (benchmarks/configs/*.toml, on top of the defaults; the file's first
comment line says what it changes); every run shares data, seed, model, epochs and batch
schedule. `--runs` tabulates run folders that already exist instead (their eval.json; a run
whose eval.json predates the uncertainty fields is evaluated again from its checkpoint).

    python benchmarks/compare_losses.py --configs benchmarks/configs/a.toml,... [--out runs/compare]
    python benchmarks/compare_losses.py --runs runs/a,runs/b [--out runs/compare]

Columns: text→image under ELK (the text-query default), image→text under the image-query
default score, RSUM under ELK, the uncertainty of caption queries (AUROC of Σσ² for a wrong
top-1, R@1 gained by keeping the 80% least uncertain queries, Spearman of Σσ² with the number
of true matches) and the training time. Writes <out>/compare.json and <out>/compare.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.scores import DEFAULT_SCORE
from encoders.training.config import load_train_config
from encoders.training.pipeline import evaluate_checkpoint
from encoders.training.train import train

EVAL_SCORES = ("mu", "csd", "elk", "mc")
COLUMNS = ("t2i R@1", "t2i PMRP", "i2t R@1", "i2t PMRP", "RSUM", "AUROC", "R@1 +80%",
           "Spearman", "train s")


def change_of(config: Path) -> str:
    """The config file's first comment line: what the run changes."""
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return config.stem


def row(name: str, change: str, report: dict) -> dict:
    t2i = report["by_score"][DEFAULT_SCORE["text"]]
    image_score = DEFAULT_SCORE["image"]
    i2t = report["by_score"].get(image_score, t2i)
    unc = report["uncertainty"]
    coverage = {c["coverage"]: c["R@1"] for c in unc["risk_coverage"]}
    return {"run": name, "change": change, "t2i R@1": t2i["t2i"]["R@1"],
            "t2i PMRP": t2i["t2i"]["PMRP"], "i2t R@1": i2t["i2t"]["R@1"],
            "i2t PMRP": i2t["i2t"]["PMRP"], "RSUM": t2i["rsum"], "AUROC": unc["auroc_failure"],
            "R@1 +80%": coverage[0.8] - coverage[1.0],
            "Spearman": unc["spearman_caption_var_vs_matches"],
            "train s": report.get("train_s", float("nan")), "eval": report}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | change | " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        vals = " | ".join(f"{r[c]:.1f}" if c in ("RSUM", "train s") else f"{r[c]:.3f}"
                          for c in COLUMNS)
        lines.append(f"| {r['run']} | {r['change']} | {vals} |")
    return "\n".join(lines)


def report_of(run: Path, root: str) -> dict:
    """The run's eval.json, evaluated again from its checkpoint when it lacks a field."""
    report = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    if "uncertainty_i2t" in report and DEFAULT_SCORE["image"] in report["by_score"]:
        return report
    logging.info("%s: evaluating the checkpoint again (eval.json predates a field)", run)
    fresh = evaluate_checkpoint(str(run / "checkpoint.pt"), report.get("dataset", "scenes"),
                                root, report["split"], EVAL_SCORES, "cpu")
    return {**fresh, "train_s": report.get("train_s", float("nan"))}  # older runs: not kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="", help="comma-separated config files to train")
    ap.add_argument("--runs", default="", help="comma-separated existing run folders")
    ap.add_argument("--root", default="data")
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for config in filter(None, args.configs.split(",")):
        config = Path(config)
        cfg = load_train_config(config, {"root": args.root, "out": f"{args.out}/{config.stem}",
                                         "export": False, "eval_scores": list(EVAL_SCORES)})
        rows.append(row(config.stem, change_of(config), train(cfg)["eval"]))
    for run in filter(None, args.runs.split(",")):
        run = Path(run)
        config = Path("benchmarks/configs") / f"{run.name}.toml"
        change = change_of(config) if config.is_file() else run.name
        rows.append(row(run.name, change, report_of(run, args.root)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
