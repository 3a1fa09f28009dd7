"""How much of the Monte-Carlo score's top k is sampling noise, and what a μ shortlist loses.

    python -m benchmarks.mc_noise --index INDEX [--queries 20] [--samples 16] [--reference 48]
        [--shortlist 200,400] [--json]

For `--queries` stored captions of INDEX (spread over its ids) against EVERY image: the fixed-
noise match probability with the served number of samples (J, the index's mc_samples unless
given) and with more (`--reference`, a less noisy estimate); then, per shortlist length S, what
the engine's order gives (the S best ⟨μ_q, μ⟩, rescored with J samples). Prints the mean
overlap of top-k sets: exhaustive-J vs reference (how much of mc's top k is noise), served vs
exhaustive-J (what `bench` calls mc recall), served vs reference, and how much of the
reference top k lies inside the μ top S. Exhaustive over the images: for indexes of up to
~100k items.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from core.served_mc import fixed_match_prob
from engine.search import SearchEngine


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a_q ∩ b_q| / |a_q| over rows of two [Q, k] id arrays."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def run(index: str, queries: int, samples: int | None, reference: int, shortlists: list[int],
        k: int = 10) -> dict:
    with SearchEngine(index) as eng:
        reader, a, b = eng.reader, eng.batch.a, eng.batch.b
        samples = samples or eng.batch.mc_samples
        n_img, n_txt = reader.count("image"), reader.count("text")
        q_ids = np.linspace(0, n_txt - 1, min(queries, n_txt)).astype(np.int64)
        mu_q, lv_q = reader.fetch("text", q_ids)
        mu_d, lv_d = reader.fetch("image", np.arange(n_img))
    t = [np.ascontiguousarray(x, np.float32) for x in (mu_q, lv_q, mu_d, lv_d)]
    ids = np.arange(n_img)
    served_p = fixed_match_prob(*t, ids, a, b, samples)
    ref_p = fixed_match_prob(*t, ids, a, b, reference)
    top_served, top_ref = (np.argsort(-p, axis=1)[:, :k] for p in (served_p, ref_p))
    ip_order = np.argsort(-(mu_q @ mu_d.T), axis=1)
    out = {"index": index, "queries": len(q_ids), "images": n_img, "k": k, "samples": samples,
           "reference_samples": reference,
           "exhaustive_vs_reference": overlap(top_served, top_ref), "shortlists": {}}
    for s in shortlists:
        short = ip_order[:, :s]
        served = np.stack([row[np.argsort(-served_p[q, row], kind="stable")[:k]]
                           for q, row in enumerate(short)])
        out["shortlists"][s] = {"served_vs_exhaustive": overlap(served, top_served),
                                "served_vs_reference": overlap(served, top_ref),
                                "reference_in_mu_shortlist": overlap(top_ref, short)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--samples", type=int, default=None, help="default: the index's mc_samples")
    ap.add_argument("--reference", type=int, default=48)
    ap.add_argument("--shortlist", default="200,400")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.index, args.queries, args.samples, args.reference,
              [int(s) for s in args.shortlist.split(",")])
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['queries']} captions x {res['images']} images, top {res['k']}: exhaustive "
          f"{res['samples']}-sample mc shares {res['exhaustive_vs_reference']:.3f} with "
          f"{res['reference_samples']} samples")
    for s, r in res["shortlists"].items():
        print(f"  mu top {s} rescored: {r['served_vs_exhaustive']:.3f} of exhaustive, "
              f"{r['served_vs_reference']:.3f} of reference; reference top {res['k']} inside "
              f"it {r['reference_in_mu_shortlist']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
