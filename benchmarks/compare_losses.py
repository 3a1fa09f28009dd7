"""Train several losses on the same scenes budget and write one comparison table.

Every run uses the same data, seed, model, epochs and batch schedule; only `loss` differs.
μ-only baselines (infonce, vse++) are evaluated with the mu score only.

    python benchmarks/compare_losses.py [--losses pcme,pcmepp,infonce] [--epochs 8]
                                        [--out runs/compare] [--config FILE]
Writes <out>/compare.json and <out>/compare.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.config import load_train_config  # noqa: E402
from encoders.train import train  # noqa: E402

COLUMNS = ("t2i R@1", "i2t R@1", "RSUM", "t2i PMRP", "i2t PMRP", "t2i mAP@R", "i2t mAP@R")


def row(loss: str, score: str, rep: dict, spearman, train_s: float) -> dict:
    return {"loss": loss, "score": score, "t2i R@1": rep["t2i"]["R@1"], "i2t R@1": rep["i2t"]["R@1"],
            "RSUM": rep["rsum"], "t2i PMRP": rep["t2i"]["PMRP"], "i2t PMRP": rep["i2t"]["PMRP"],
            "t2i mAP@R": rep["t2i"]["mAP@R"], "i2t mAP@R": rep["i2t"]["mAP@R"],
            "spearman": spearman, "train_s": train_s}


def markdown(rows: list[dict]) -> str:
    head = "| loss | score | " + " | ".join(COLUMNS) + " | Spearman(Σσ², matches) | train s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        sp = "–" if r["spearman"] is None else f"{r['spearman']:.3f}"
        vals = " | ".join(f"{r[c]:.1f}" if c == "RSUM" else f"{r[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {r['loss']} | {r['score']} | {vals} | {sp} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--losses", default="pcme,pcmepp,infonce")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--root", default="data")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for loss in args.losses.split(","):
        cfg = load_train_config(args.config, {"loss": loss, "epochs": args.epochs, "root": args.root,
                                              "out": f"{args.out}/{loss}", "export": False})
        result = train(cfg)
        report = result["eval"]
        unc = report.get("uncertainty", {})
        spearman = unc.get("spearman_caption_var_vs_matches") if loss in ("pcme", "pcmepp") else None
        for score, rep in report["by_score"].items():
            rows.append(row(loss, score, rep, spearman, result["train_s"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
