"""Regenerate the README's result tables from a run's eval.json, so its figures cannot drift.

A table in README.md is generated when it sits between two markers naming it and its source:

    <!-- readme-table:levels runs/latest/eval.json -->
    ...(replaced)...
    <!-- /readme-table:levels -->

`levels`: caption level, true matches, Σσ², t2i R@1 (the eval's per-group uncertainty report);
`scores`: R@1/R@5/R@10/PMRP/mAP@R per score and direction, and RSUM.

    python benchmarks/readme_tables.py            # rewrite README.md in place
    python benchmarks/readme_tables.py --check    # exit 1 when a table differs from its eval.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- readme-table:(\w+) (\S+) -->\n)(.*?)(<!-- /readme-table:\2 -->)", re.S)


def levels_table(report: dict) -> str:
    rows = ["| caption level | true matches | Σσ² | t2i R@1 |", "|---|---|---|---|"]
    for g in report["uncertainty"]["by_group"]:
        rows.append(f"| {g['group']} | {g['mean_matches']:.0f} | {g['mean_var']:.3f} | {g['R@1']:.2f} |")
    return "\n".join(rows)


def scores_table(report: dict) -> str:
    rows = ["| score | dir | R@1 | R@5 | R@10 | PMRP | mAP@R | RSUM |", "|---|---|---|---|---|---|---|---|"]
    for name, rep in report["by_score"].items():
        for d in ("t2i", "i2t"):
            m = rep[d]
            rsum = f"{rep['rsum']:.1f}" if d == "t2i" and "rsum" in rep else ""
            rows.append(f"| {name} | {d} | " + " | ".join(f"{m[k]:.3f}" for k in
                        ("R@1", "R@5", "R@10", "PMRP", "mAP@R")) + f" | {rsum} |")
    return "\n".join(rows)


TABLES = {"levels": levels_table, "scores": scores_table}


def render(readme: str, base: Path) -> str:
    """README text with every marked table regenerated from its eval.json (relative to `base`)."""
    def one(m: re.Match) -> str:
        name, source = m.group(2), m.group(3)
        if name not in TABLES:
            raise SystemExit(f"README: unknown table {name!r}; known: {', '.join(TABLES)}")
        path = base / source
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"README table {name}: cannot read {path} ({e})") from None
        return m.group(1) + TABLES[name](report) + "\n" + m.group(5)
    return BLOCK.sub(one, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text(encoding="utf-8")
    new = render(old, path.parent)
    if args.check:
        if new != old:
            print(f"{path}: tables differ from their eval.json; run benchmarks/readme_tables.py")
            return 1
        print(f"{path}: tables match their eval.json")
        return 0
    path.write_text(new, encoding="utf-8")
    print(f"{path}: {len(BLOCK.findall(old))} table(s) regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
