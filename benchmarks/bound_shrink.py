"""How much the per-dimension μ caps shrink the guaranteed shortlist (indexer/variance.py).

    python benchmarks/bound_shrink.py --index INDEX [--queries 100] [--scores elk,bhattacharyya]

On the index's stored caption vectors as queries, for each bounded score: the shortlist the
engine rescores with the capped bound (the manifest's μ range) and with the line bound (the
same stats without it, as an older manifest reads), and the least shortlist any exact bound on
the μ ranking could use: the deepest μ-rank among the true top-k (exhaustive search). Prints
one JSON object."""
from __future__ import annotations

import argparse
import json

import numpy as np

from engine.batch import BatchSearcher
from indexer.reader import IndexReader
from indexer.variance import VarianceBounds


def shortlists(reader, score, mu, lv, k, bounds) -> np.ndarray:
    searcher = BatchSearcher(reader, 5.0, 5.0)
    searcher._bound_cache["image"] = bounds
    return searcher.search("image", mu, lv, k, score).shortlist, searcher


def deepest_rank(reader, searcher, score, mu, lv, k) -> np.ndarray:
    truth = searcher.search("image", mu, lv, k, score, exact=True).ids
    _, all_mu, _ = reader.all_vectors("image")
    ip = mu @ all_mu.T
    return np.asarray([int((ip[i] >= ip[i, truth[i]].min()).sum()) for i in range(len(mu))])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--scores", default="elk,bhattacharyya,csd,w2")
    args = p.parse_args(argv)
    out = {"index": args.index, "k": args.k, "scores": {}}
    with IndexReader.open(args.index) as reader:
        stats = reader.variance_stats("image")
        capped = VarianceBounds.from_json(stats)
        line = VarianceBounds.from_json({k: v for k, v in stats.items()
                                         if k not in ("mu_min", "mu_max")})
        _, mu, lv = reader.all_vectors("text")
        pick = np.unique(np.linspace(0, len(mu) - 1, args.queries).astype(np.int64))
        mu, lv = mu[pick], lv[pick]
        out["n"], out["queries"] = reader.count("image"), len(pick)
        for score in args.scores.split(","):
            with_caps, searcher = shortlists(reader, score, mu, lv, args.k, capped)
            without, _ = shortlists(reader, score, mu, lv, args.k, line)
            least = deepest_rank(reader, searcher, score, mu, lv, args.k)
            out["scores"][score] = {
                "shortlist_p50_line": float(np.median(without)),
                "shortlist_p50_capped": float(np.median(with_caps)),
                "shrink_p50": round(float(np.median(with_caps / without)), 3),
                "least_possible_p50": float(np.median(least))}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
