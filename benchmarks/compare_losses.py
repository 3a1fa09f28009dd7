"""Train several losses on the same scenes budget and write one comparison table.

Every run uses the same data, seed, model, epochs and batch schedule; only `loss` differs.
Probabilistic losses are evaluated with mu, csd, elk and mc; μ-only baselines (infonce, vse++)
with mu only (their σ heads are untrained).

    python benchmarks/compare_losses.py [--losses pcme,pcmepp,infonce] [--epochs 8]
                                        [--positives pairs|plausible|pairs,plausible]
                                        [--out runs/compare] [--config FILE]
Writes <out>/compare.json and <out>/compare.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from encoders.training.config import load_train_config
from encoders.training.losses_baselines import PROBABILISTIC
from encoders.training.train import train

SCORES = ("mu", "csd", "elk", "mc")
COLUMNS = ("t2i R@1", "i2t R@1", "RSUM", "t2i PMRP", "i2t PMRP", "t2i mAP@R", "i2t mAP@R")


def row(loss: str, positives: str, score: str, rep: dict, spearman, train_s: float) -> dict:
    return {"loss": loss, "positives": positives, "score": score, "t2i R@1": rep["t2i"]["R@1"], "i2t R@1": rep["i2t"]["R@1"],
            "RSUM": rep["rsum"], "t2i PMRP": rep["t2i"]["PMRP"], "i2t PMRP": rep["i2t"]["PMRP"],
            "t2i mAP@R": rep["t2i"]["mAP@R"], "i2t mAP@R": rep["i2t"]["mAP@R"],
            "spearman": spearman, "train_s": train_s}


def markdown(rows: list[dict]) -> str:
    head = ("| loss | positives | score | " + " | ".join(COLUMNS)
            + " | Spearman(Σσ², matches) | train s |")
    lines = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for r in rows:
        sp = "–" if r["spearman"] is None else f"{r['spearman']:.3f}"
        vals = " | ".join(f"{r[c]:.1f}" if c == "RSUM" else f"{r[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {r['loss']} | {r['positives']} | {r['score']} | {vals} | {sp} "
                     f"| {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--losses", default="pcme,pcmepp,infonce")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--positives", default="pairs",
                    help="comma-separated: pairs, plausible (every caption true of the image)")
    ap.add_argument("--root", default="data")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for positives in args.positives.split(","):
        for loss in args.losses.split(","):
            cfg = load_train_config(args.config, {
                "loss": loss, "positives": positives, "epochs": args.epochs, "root": args.root,
                "out": f"{args.out}/{loss}-{positives}", "export": False,
                "eval_scores": list(SCORES if loss in PROBABILISTIC else ("mu",))})
            result = train(cfg)
            report = result["eval"]
            unc = report.get("uncertainty", {})
            spearman = unc.get("spearman_caption_var_vs_matches") if loss in PROBABILISTIC else None
            for score, rep in report["by_score"].items():
                rows.append(row(loss, positives, score, rep, spearman, result["train_s"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
