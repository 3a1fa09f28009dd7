"""Check a text query's hits against the scenes ground truth.

Runs the query through the engine (same path as `cli.py query`), parses the query into a scenes
predicate and says, for every hit, whether the predicate holds for that image and what the image
contains. Also prints how many test images the predicate is true of.

    python benchmarks/check_query.py "people waiting for a train" [--index index] [--k 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encoders.training.data import load_split
from encoders.training.data.predicates import holds, parse_caption
from encoders.model.query import QueryEncoder
from engine.search import SearchEngine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("query")
    ap.add_argument("--index", default="index")
    ap.add_argument("--root", default="data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--score", default="elk")
    args = ap.parse_args()
    predicate = parse_caption(args.query)
    if predicate is None:
        print(f"'{args.query}' is not in the scenes caption language; nothing to check")
        return 2
    split = load_split("scenes", Path(args.root), args.split)
    by_path = {str((split.root / p).resolve()): i for i, p in enumerate(split.image_paths)}
    n_true = sum(holds(predicate, s) for s in split.scenes)
    print(f"query: {args.query!r}  predicate true of {n_true} of {split.n_images} images")
    with SearchEngine(args.index, make_encoder=QueryEncoder.for_index) as engine:
        result = engine.query_text(args.query, args.k, args.score)
    n_ok = 0
    for hit in result.results:
        scene = split.scenes[by_path[hit.item]]
        ok = holds(predicate, scene)
        n_ok += ok
        contents = ", ".join(sorted(o.category for o in scene.objects))
        print(f"{hit.rank:3d} {'TRUE ' if ok else 'false'} {scene.setting:8s} [{contents}]  {hit.item}")
    print(f"{n_ok}/{len(result.results)} hits satisfy the query's predicate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
